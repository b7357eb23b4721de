"""Images that carry their own id (64 bits as 4x4-pixel black/white blocks; survive JPEG)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def id_image(i: int, size: int = 32) -> Image.Image:
    bits = np.array([(i >> b) & 1 for b in range(64)], dtype=np.uint8).reshape(8, 8) * 255
    img = np.kron(bits, np.ones((size // 8, size // 8), dtype=np.uint8))
    return Image.fromarray(img, "L")


def decode_id(x: torch.Tensor) -> int:
    """x: uint8 CHW of an unaugmented (resized, not cropped or flipped) id image."""
    g = x[0].float()
    h, w = g.shape
    blocks = g.reshape(8, h // 8, 8, w // 8).mean(dim=(1, 3)) > 127
    return int(sum(int(v) << b for b, v in enumerate(blocks.flatten().tolist())))


def make_id_folder(root: Path, n: int, classes: int) -> Path:
    for i in range(n):
        d = root / f"class{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        id_image(i).save(d / f"{i:05d}.png")
    return root


def write_tar(path: Path, samples: list[dict]) -> None:
    """A hand-made shard, for bad-data cases the writer would refuse to produce."""
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def jpeg_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    id_image(i).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()
