"""Loader settings that keep each id image intact, batches read back as ids, shards with one bad sample."""

from pathlib import Path

import torch

from ffscale.config import DataCfg
from ffscale.data.ingest.writer import write_dali_indexes
from helpers.ids import decode_id, jpeg_bytes, write_tar


def plain_cfg(loader: str, **kw) -> DataCfg:
    # No crop/flip, so every image keeps its id; mean/std irrelevant (uint8 out).
    fixed = dict(img_size=32, crop_pct=1.0, scale=[1.0, 1.0], ratio=[1.0, 1.0], hflip=0.0, workers=0)
    return DataCfg(loader=loader, **{**fixed, "color_jitter": 0.0, "rand_augment": False, **kw})


def collect(loader, epoch=0, skip=0):
    ids, labels, sizes = [], [], []
    for x, y in loader.epoch(epoch, skip):
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1:] == (3, 32, 32)
        assert y.dtype == torch.int64
        sizes.append(len(y))
        for xi, yi in zip(x, y.tolist()):
            if yi >= 0:
                ids.append(decode_id(xi.cpu()))
                labels.append(yi)
    return ids, labels, sizes


def bad_shards(tmp: Path, case: str) -> Path:
    good = [{"__key__": f"{i:04d}", "jpg": jpeg_bytes(i), "cls": str(i % 3).encode()} for i in range(64)]
    bad = dict(good[5])
    if case == "label_range":
        bad["cls"] = b"42"
    elif case == "no_label":
        del bad["cls"]
    elif case == "corrupt_jpeg":
        bad["jpg"] = b"\xff\xd8\xff garbage"
    elif case == "empty_jpeg":
        bad["jpg"] = b""
    good[5] = bad
    d = tmp / case
    d.mkdir()
    write_tar(d / "s-000000.tar", good[:32])
    write_tar(d / "s-000001.tar", good[32:])
    from ffscale.data.manifest import Manifest, ShardInfo, sha256_file

    files = sorted(d.glob("*.tar"))
    write_dali_indexes(files)
    Manifest("s", ["a", "b", "c"], [ShardInfo(f.name, 32, sha256_file(f)) for f in files]).save(d)
    return d
