"""Shards as another tool writes them (plain webdataset, its own keys and members), indexed in place."""

from __future__ import annotations

import io
import json
from pathlib import Path

import webdataset as wds

from ffscale.cli import main
from helpers.ids import id_image


def third_party(d: Path, split: str, n: int, label: str, ext: str) -> None:
    """Shards as another tool writes them: plain webdataset, its own keys and member names."""
    with wds.ShardWriter(str(d / f"other-{split}-%04d.tar"), maxcount=n // 3 + 1, verbose=0) as sink:
        for i in range(n):
            buf = io.BytesIO()
            id_image(i).convert("RGB").save(buf, format={"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext],
                                            **({"lossless": True} if ext == "webp" else {}))  # fmt: skip
            s = {"__key__": f"n0{i % 4}_{i:05d}", ext: buf.getvalue()}
            if label == "cls":
                s["cls"] = str(i % 4).encode()
            else:
                s["json"] = json.dumps({"label": i % 4, "filename": f"n0{i % 4}_{i:05d}.JPEG"}).encode()
            sink.write(s)


def make_foreign(d: Path) -> Path:
    """train (.jpeg + .cls), val (.png + .json), webp (.webp + .json) of another tool in one
    directory, each split indexed on its own."""
    (d / "shards").mkdir()
    third_party(d / "shards", "train", 96, "cls", "jpeg")
    third_party(d / "shards", "val", 48, "json", "png")
    third_party(d / "shards", "webp", 24, "json", "webp")
    for split in ("train", "val", "webp"):
        args = ["shard", "index", str(d / "shards"), "--pattern", f"other-{split}-*.tar"]
        assert main([*args, "--out", str(d / split), "--workers", "2"]) == 0
    return d
