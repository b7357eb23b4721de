"""DeiT's RandAugment (timm's `rand-m9-mstd0.5-inc1`) on PIL images, for the webdataset loader: the
same ops, magnitudes and draws as timm 0.3.2's auto_augment.py (lines 558-678) and as the DALI
graph of ffscale/data/randaug.py, so a fallback from DALI changes the speed, not the recipe.

Per image: 2 ops drawn uniformly with replacement from the 15 `_RAND_INCREASING_TRANSFORMS`; each
is applied with probability 0.5 at magnitude N(9, 0.5) clipped to [0, 10], as level / 10 of its
range, the sign of signed ops flipped with probability 0.5. Geometric ops resample bicubically
(DeiT passes `--train-interpolation bicubic`: timm 0.3.2 transforms_factory.py:89-90) and fill
with the mean colour (`img_mean`). `tests/integration/test_randaug.py` holds every op, at every level, to
timm's own functions pixel for pixel.
"""

from __future__ import annotations

import random

from PIL import Image, ImageEnhance, ImageOps

LEVELS = 10.0  # timm's _MAX_LEVEL / _LEVEL_DENOM
TRANSLATE_PCT = 0.45  # timm's _HPARAMS_DEFAULT translate_pct


def _affine(img, m, fill, resample):
    return img.transform(img.size, Image.AFFINE, m, resample=resample, fillcolor=fill)


def _solarize_add(img, add, fill=None, resample=None, thresh=128):
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * (len(img.getbands())))


def _posterize(img, bits, *_):
    """Keep the top `bits` bits. At level 10 timm asks for 0 bits: the Pillow of DeiT's time made that
    a black image (mask ~(2**8 - 1)); Pillow >= 9 refuses bits < 1, so the mask is applied here."""
    if bits >= 8:
        return img
    mask = ~(2 ** (8 - bits) - 1)
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _enhance(cls):
    return lambda img, factor, *_: cls(img).enhance(factor)


# name: (op(img, arg, fill, resample), arg of an unsigned level in [0, 10], signed)
OPS = {
    "AutoContrast": (lambda img, _a, *_: ImageOps.autocontrast(img), None, False),
    "Equalize": (lambda img, _a, *_: ImageOps.equalize(img), None, False),
    "Invert": (lambda img, _a, *_: ImageOps.invert(img), None, False),
    "Rotate": (lambda img, deg, fill, rs: img.rotate(deg, resample=rs, fillcolor=fill), lambda v: 30.0 * v / LEVELS, True),
    "PosterizeIncreasing": (_posterize, lambda v: 4 - int(v / LEVELS * 4), False),
    "SolarizeIncreasing": (lambda img, t, *_: ImageOps.solarize(img, t), lambda v: 256 - int(v / LEVELS * 256), False),
    "SolarizeAdd": (_solarize_add, lambda v: int(v / LEVELS * 110), False),
    "ColorIncreasing": (_enhance(ImageEnhance.Color), lambda v: v / LEVELS * 0.9, True),
    "ContrastIncreasing": (_enhance(ImageEnhance.Contrast), lambda v: v / LEVELS * 0.9, True),
    "BrightnessIncreasing": (_enhance(ImageEnhance.Brightness), lambda v: v / LEVELS * 0.9, True),
    "SharpnessIncreasing": (_enhance(ImageEnhance.Sharpness), lambda v: v / LEVELS * 0.9, True),
    "ShearX": (lambda img, f, fill, rs: _affine(img, (1, f, 0, 0, 1, 0), fill, rs), lambda v: v / LEVELS * 0.3, True),
    "ShearY": (lambda img, f, fill, rs: _affine(img, (1, 0, 0, f, 1, 0), fill, rs), lambda v: v / LEVELS * 0.3, True),
    "TranslateXRel": (lambda img, p, fill, rs: _affine(img, (1, 0, p * img.size[0], 0, 1, 0), fill, rs),
                      lambda v: v / LEVELS * TRANSLATE_PCT, True),
    "TranslateYRel": (lambda img, p, fill, rs: _affine(img, (1, 0, 0, 0, 1, p * img.size[1]), fill, rs),
                      lambda v: v / LEVELS * TRANSLATE_PCT, True),
}  # fmt: skip
ENHANCE = {"ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}


def op_arg(name: str, level: float, negative: bool = False):
    """The argument op `name` gets at `level` (timm's LEVEL_TO_ARG), None for argument-free ops."""
    _, arg, signed = OPS[name]
    if arg is None:
        return None
    a = arg(level)
    a = -a if signed and negative else a
    return 1.0 + a if name in ENHANCE else a  # enhance factors are 1 +- level


def apply(img: Image.Image, name: str, level: float, negative: bool, fill: tuple, resample=Image.BICUBIC):
    return OPS[name][0](img, op_arg(name, level, negative), fill, resample)


def rand_augment(img: Image.Image, rng: random.Random, fill: tuple, n: int = 2, m: float = 9.0,
                 mstd: float = 0.5, prob: float = 0.5, resample=Image.BICUBIC) -> Image.Image:  # fmt: skip
    """`n` ops drawn with replacement, each applied with probability `prob` at N(m, mstd) in [0, 10]."""
    names = list(OPS)
    for name in [names[rng.randrange(len(names))] for _ in range(n)]:
        if rng.random() > prob:
            continue
        level = max(0.0, min(LEVELS, rng.gauss(m, mstd)))
        img = apply(img, name, level, rng.random() < 0.5, fill, resample)
    return img
