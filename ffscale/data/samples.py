"""One raw WebDataset sample (a dict of bytes) -> its label and image, or a DataError naming the
shard and key. Used by the webdataset loader and to locate a sample DALI failed on."""

from __future__ import annotations

import io

from PIL import Image

from ..errors import DataError


def where(sample: dict) -> str:
    return f"shard {sample.get('__url__')} sample {sample.get('__key__')}"


def parse_label(sample: dict, num_classes: int) -> int:
    raw = sample.get("cls")
    if raw is None:
        raise DataError(f"{where(sample)}: no .cls label")
    try:
        y = int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{where(sample)}: label {raw[:20]!r} is not an integer") from e
    if not 0 <= y < num_classes:
        raise DataError(f"{where(sample)}: label {y} out of range [0, {num_classes})")
    return y


def decode_image(sample: dict) -> Image.Image:
    data = sample.get("jpg") or sample.get("jpeg") or sample.get("png")
    if not data:
        raise DataError(f"{where(sample)}: no image (.jpg) or an empty one")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        raise DataError(f"{where(sample)}: cannot decode image ({e})") from e
    return img
