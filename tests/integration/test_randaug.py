"""DeiT's RandAugment as DALI runs it, held against timm's own definitions (timm's auto_augment.py
is loaded from the installed timm wheel by path: the rest of timm imports torchvision, which does not
import beside the CPU torch wheel)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from ffscale.data import randaug


@pytest.fixture(scope="module")
def timm_aa():
    spec = importlib.util.find_spec("timm")
    if spec is None:
        pytest.skip("timm is not installed (scripts/setup.sh installs it without dependencies)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "auto_augment.py"
    mod_spec = importlib.util.spec_from_file_location("timm_auto_augment", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def our_arg(name: str, op, level: float, img_size: int) -> float:
    """The parameter DALI gets at `level`, in timm's units (unsigned)."""
    p = op.mag_to_param(level)
    if name in ("Rotate", "SolarizeIncreasing", "SolarizeAdd"):
        return float(p)
    if name == "PosterizeIncreasing":
        return float(bin(int(p)).count("1"))  # bits kept
    if name.endswith("Increasing") and name != "SharpnessIncreasing":
        return abs(float(p) - 1)
    if name == "SharpnessIncreasing":  # kernel centre = 5/13 + f * 8/13
        return abs((float(p[1][1]) - 5 / 13) * 13 / 8 - 1)
    if name in ("ShearX", "TranslateXRel"):
        return float(p[0]) / (img_size if name == "TranslateXRel" else 1)
    if name in ("ShearY", "TranslateYRel"):
        return float(p[1]) / (img_size if name == "TranslateYRel" else 1)
    raise AssertionError(name)


def timm_arg(timm_aa, name: str, level: float) -> float | None:
    fn = timm_aa.LEVEL_TO_ARG[name]
    if fn is None:
        return None
    v = float(fn(level, dict(timm_aa._HPARAMS_DEFAULT))[0])
    return (
        abs(v - 1)
        if name.endswith("Increasing") and "Posterize" not in name and "Solarize" not in name
        else abs(v)
    )


def test_the_policy_is_timms_rand_m9_mstd05_inc1(timm_aa):
    ra = timm_aa.rand_augment_transform("rand-m9-mstd0.5-inc1", {"img_mean": (124, 116, 104)})
    assert [op.name for op in ra.ops] == list(randaug.timm_suite(224))
    assert ra.num_layers == 2 and {(op.prob, op.magnitude, op.magnitude_std) for op in ra.ops} == {
        (0.5, 9, 0.5)
    }
    assert timm_aa._LEVEL_DENOM == randaug.LEVELS
    defaults = randaug.rand_augment.__defaults__  # n, m, mstd, prob
    assert defaults[:4] == (2, 9.0, 0.5, 0.5)


@pytest.mark.parametrize("level", [0.0, 4.5, 7.0, 9.0, 9.5, 10.0])
def test_every_op_gets_timms_parameter_at_each_level(timm_aa, level):
    img_size = 224
    for name, op in randaug.timm_suite(img_size).items():
        expected = timm_arg(timm_aa, name, level)
        if expected is None:  # AutoContrast, Equalize, Invert: no magnitude
            continue
        assert our_arg(name, op, level, img_size) == pytest.approx(expected, abs=1e-6), (name, level)


def test_at_m9_rotation_reaches_27_degrees_not_dalis_9():
    rotate = randaug.timm_suite(224)["Rotate"]
    mags = np.linspace(*rotate.mag_range, randaug.BINS)
    assert rotate.mag_to_param(mags[90]) == pytest.approx(27.0)  # bin 90 = level 9.0


def test_the_pipeline_runs_at_the_top_magnitude():
    """N(10, 0.5) clipped to 10 lands on the last magnitude bin half the time (DALI's cast rounds
    100.5 up: a bin past the table failed the run)."""
    from nvidia.dali import fn, pipeline_def, types

    images = [np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8) for i in range(64)]

    @pipeline_def(batch_size=64, num_threads=1, device_id=None, seed=0, enable_conditionals=True)
    def pipe():
        img = fn.external_source(source=lambda: images, batch=True, layout="HWC", dtype=types.UINT8)
        return randaug.rand_augment(img, 32, m=10.0, mstd=0.5)

    p = pipe()
    p.build()
    for _ in range(4):
        (out,) = p.run()
        assert np.asarray(out[0]).shape == (32, 32, 3)


# -- the webdataset loader's RandAugment (PIL), op by op against timm's own functions ------------
def _picture(size=48):
    rng = np.random.default_rng(3)
    from PIL import Image

    return Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8))


@pytest.mark.parametrize("level", [0.0, 3.0, 9.0, 10.0])
@pytest.mark.parametrize("negative", [False, True])
def test_every_pil_op_gives_timms_pixels_at_each_level(timm_aa, level, negative, monkeypatch):
    from PIL import Image

    from ffscale.data import randaug_pil

    monkeypatch.setattr(timm_aa, "_randomly_negate", lambda v: -v if negative else v)
    hp = {**timm_aa._HPARAMS_DEFAULT, "img_mean": (124, 116, 104), "interpolation": Image.BICUBIC}
    img = _picture()
    assert list(randaug_pil.OPS) == [
        name for name in timm_aa._RAND_INCREASING_TRANSFORMS
    ]  # the same 15, in timm's order
    for name in randaug_pil.OPS:
        args = timm_aa.LEVEL_TO_ARG[name](level, hp) if timm_aa.LEVEL_TO_ARG[name] else ()
        ours = randaug_pil.apply(img, name, level, negative, hp["img_mean"])
        if name == "PosterizeIncreasing" and args == (0,):  # Pillow >= 9 refuses 0 bits; DeiT's gave black
            assert not np.asarray(ours).any()
            continue
        theirs = timm_aa.NAME_TO_OP[name](img, *args, fillcolor=hp["img_mean"], resample=Image.BICUBIC)
        assert np.array_equal(np.asarray(ours), np.asarray(theirs)), (name, level, negative)


def test_pil_rand_augment_draws_two_ops_at_m9_and_is_seeded():
    import random

    from ffscale.data import randaug_pil

    img = _picture()
    a = randaug_pil.rand_augment(img, random.Random(5), (124, 116, 104))
    b = randaug_pil.rand_augment(img, random.Random(5), (124, 116, 104))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    changed = sum(
        not np.array_equal(
            np.asarray(randaug_pil.rand_augment(img, random.Random(s), (0, 0, 0))), np.asarray(img)
        )
        for s in range(200)
    )
    assert (
        115 < changed < 175
    )  # ~143 expected: both ops skipped with p 0.25, AutoContrast a no-op on full-range noise
    assert randaug_pil.rand_augment.__defaults__[:4] == (2, 9.0, 0.5, 0.5)
