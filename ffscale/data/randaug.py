"""DeiT's RandAugment (timm's `rand-m9-mstd0.5-inc1`) built from DALI's public augmentation blocks.

DALI's own `rand_augment(n=2, m=9)` maps m onto 31 magnitude bins, so m=9 is 30% of each op's range
(rotation up to 9 degrees); in timm, and so in DeiT, a magnitude is level / 10 of the range (27
degrees at m=9), drawn per op from N(m, 0.5) and clipped to [0, 10], and each chosen op is applied
with probability 0.5. Here every op's magnitude is the timm level itself (101 bins over [0, 10],
so the noise survives to 0.1 of a level) and `mag_to_param` is timm's level-to-argument rule.
`tests/integration/test_randaug.py` holds every op's parameter against timm's own definitions.
"""

from __future__ import annotations

import numpy as np

LEVELS = 10.0  # timm's _LEVEL_DENOM: a magnitude is level / 10 of an op's range
BINS = 101  # magnitudes 0.0, 0.1, ..., 10.0


def _enhance(level):  # timm's *Increasing enhance ops: factor 1 +- 0.9 * level / 10
    return 1.0 + 0.9 * level / LEVELS


def _posterize_mask(level):  # timm PosterizeIncreasing: keep 4 - int(4 * level / 10) bits
    bits = 4 - int(4 * abs(level) / LEVELS)
    return np.array(np.uint8(255) ^ np.uint8(2 ** (8 - bits) - 1), dtype=np.uint8)


def _solarize_threshold(level):  # timm SolarizeIncreasing: 256 - int(256 * level / 10)
    return np.array(256 - int(256 * level / LEVELS), dtype=np.int32)


def _solarize_add(level):  # timm SolarizeAdd: add int(110 * level / 10) below 128
    return np.uint8(int(110 * level / LEVELS))


def _sharpness_kernel(level):  # PIL's Sharpness with factor f: f * image + (1 - f) * smooth
    f = _enhance(level)
    smooth = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13
    ident = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=np.float32)
    return (1 - f) * smooth + f * ident


def timm_suite(img_size: int) -> dict:
    """timm's _RAND_INCREASING_TRANSFORMS as DALI augmentations, keyed by timm's names."""
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.pipeline import do_not_convert

    lv = (0.0, LEVELS)

    # A pipeline with conditionals runs every call inside it through AutoGraph, and DALI maps each of
    # the 101 magnitudes through mag_to_param while it builds the graph: plain NumPy arithmetic, which
    # do_not_convert (for functions that take no DataNode, DALI's pipeline.py) keeps out of it.
    # Building the pipeline then costs about a fifth less CPU time; the graph is the same.
    def signed(aug, to_param):
        return aug.augmentation(mag_range=lv, randomly_negate=True, mag_to_param=do_not_convert(to_param))

    def plain(aug, to_param):
        return aug.augmentation(mag_range=lv, randomly_negate=False, mag_to_param=do_not_convert(to_param))

    translate = 0.45 * img_size / LEVELS  # timm translate_pct 0.45 of the (square) image
    return {
        "AutoContrast": a.auto_contrast,
        "Equalize": a.equalize,
        "Invert": a.invert,
        "Rotate": signed(a.rotate, lambda level: 30.0 * level / LEVELS),
        "PosterizeIncreasing": plain(a.posterize, _posterize_mask),
        "SolarizeIncreasing": plain(a.solarize, _solarize_threshold),
        "SolarizeAdd": plain(a.solarize_add, _solarize_add),
        "ColorIncreasing": signed(a.color, _enhance),
        "ContrastIncreasing": signed(a.contrast, _enhance),
        "BrightnessIncreasing": signed(a.brightness, _enhance),
        "SharpnessIncreasing": signed(a.sharpness, _sharpness_kernel),
        "ShearX": signed(a.shear_x, lambda level: [0.3 * level / LEVELS, 0]),
        "ShearY": signed(a.shear_y, lambda level: [0, 0.3 * level / LEVELS]),
        "TranslateXRel": signed(a.translate_x_no_shape, lambda level: [translate * level, 0]),
        "TranslateYRel": signed(a.translate_y_no_shape, lambda level: [0, translate * level]),
    }


def rand_augment(
    img, img_size: int, n: int = 2, m: float = 9.0, mstd: float = 0.5, prob: float = 0.5, fill=128
):
    """Inside a DALI pipeline (enable_conditionals=True), on HWC uint8 images of img_size: `n` ops
    drawn with replacement, each applied with probability `prob` at magnitude N(m, mstd) in [0, 10]."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug.core import select, signed_bin

    ops = [*timm_suite(img_size).values(), a.identity]
    skip = len(ops) - 1
    chosen = fn.random.uniform(values=list(range(skip)), shape=(n,), dtype=types.INT32)
    applied = fn.random.coin_flip(probability=prob, shape=(n,), dtype=types.INT32)
    op_idx = chosen * applied + skip * (1 - applied)
    level = dmath.clamp(fn.random.normal(mean=m, stddev=mstd, shape=(n,)), 0.0, LEVELS)
    # DALI's cast rounds to nearest (100.5 -> 101): no +0.5 here, and the bin is clamped anyway
    bins = dmath.clamp(fn.cast(level * ((BINS - 1) / LEVELS), dtype=types.INT32), 0, BINS - 1)
    bins = signed_bin(bins, shape=(n,))
    for i in range(n):
        img = select(
            ops, op_idx[i], data=img, magnitude_bin=bins[i], num_magnitude_bins=BINS, fill_value=fill
        )
    return img
