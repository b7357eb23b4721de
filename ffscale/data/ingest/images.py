"""One image file's bytes -> the bytes a shard stores: the original where every decoder takes it,
else an RGB JPEG, with the reason (counted in the manifest).

nvJPEG (DALI's `mixed` decode) takes baseline and progressive 8-bit JPEGs in RGB or greyscale; it
fails on CMYK/YCCK JPEGs (22 in ImageNet's train set) and on other formats under a `.JPEG` name (one
PNG). Converting those here, once, keeps the training loop free of per-sample fallbacks.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ffscale.errors import DataError

KEEP_MODES = {"RGB", "L"}  # JPEG colour modes every decoder reads
QUALITY = 95


def to_jpeg(img: Image.Image, quality: int = QUALITY) -> bytes:
    buf = io.BytesIO()
    _rgb(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: keep the top 8 bits
        a = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray((a >> 8 if a.max() > 255 else a).clip(0, 255).astype(np.uint8), "L")
    elif img.mode == "P" or img.mode == "PA":
        img = img.convert("RGBA")
    return img.convert("RGB")


def prepare(data: bytes, name: str, max_side: int = 0) -> tuple[bytes, str | None]:
    """(bytes to store, why they were re-encoded or None). A file PIL cannot read is a DataError
    naming it: found at sharding time, not as a decode failure mid-epoch."""
    try:
        img = Image.open(io.BytesIO(data))
        img.verify()
        img = Image.open(io.BytesIO(data))
        big = max_side and max(img.size) > max_side
        if img.format == "JPEG" and img.mode in KEEP_MODES and not big:
            # kept as is: decoding at 1/8 scale still reads every coded block (a truncated file
            # fails here) in 0.83 ms instead of 1.23-1.36 ms for a ~110 KB 500x375 JPEG
            img.draft(img.mode, (img.width // 8, img.height // 8))
            img.load()
            return data, None
        if big:
            s = max_side / max(img.size)
            size = (max(1, round(img.width * s)), max(1, round(img.height * s)))
            if img.format == "JPEG":  # shrink in the DCT while decoding (to >= size), then resample
                img.draft(img.mode, size)
        img.load()
    except Exception as e:
        raise DataError(f"{name}: not a readable image ({e})") from e
    reason = None
    if img.format != "JPEG":
        reason = f"{(img.format or 'unknown').lower()} {img.mode}"
    elif img.mode not in KEEP_MODES:
        reason = f"jpeg {img.mode}"  # CMYK, and YCCK (PIL reads it as CMYK)
    if big:
        img = _rgb(img).resize(size, Image.Resampling.LANCZOS)
        reason = reason or "downscaled"
    if reason is None:
        return data, None
    return to_jpeg(img), reason
