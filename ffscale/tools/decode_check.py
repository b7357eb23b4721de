"""`ffscale bench decode SHARDS`: the same shards through two decode paths, eval
transform (shorter side resized, centre crop), sample by sample: labels must be identical; pixel
differences are reported (max, mean, share within 1 grey level). On a GPU host: DALI's mixed (nvJPEG)
pipeline against its CPU pipeline; on a CPU host: DALI's CPU pipeline against the webdataset loader
(PIL), whose resize differs, so only the labels are expected equal there."""

from __future__ import annotations

import torch

from ffscale.config import DataCfg
from ffscale.data.loader import build_loader


def samples(kind: str, root: str, device: torch.device, img_size: int, limit: int):
    cfg = DataCfg(loader=kind, img_size=img_size, workers=2 if kind == "dali" else 0)
    loader, _ = build_loader(cfg, root, False, 0, 1, 64, 0, None, device)
    n = 0
    for x, y in loader.epoch(0):
        real = y >= 0
        yield x[real.to(x.device)].cpu(), y[real].cpu()
        n += int(real.sum())
        if n >= limit:
            return


def compare(
    root: str, a: tuple[str, str], b: tuple[str, str], img_size: int = 224, limit: int = 1000
) -> dict:
    xs_a, ys_a = zip(*samples(a[0], root, torch.device(a[1]), img_size, limit))
    xs_b, ys_b = zip(*samples(b[0], root, torch.device(b[1]), img_size, limit))
    xa, xb = torch.cat(xs_a)[:limit], torch.cat(xs_b)[:limit]
    ya, yb = torch.cat(ys_a)[:limit], torch.cat(ys_b)[:limit]
    diff = (xa.int() - xb.int()).abs()
    return {
        "a": f"{a[0]} on {a[1]}",
        "b": f"{b[0]} on {b[1]}",
        "images": len(ya),
        "labels_identical": bool(torch.equal(ya, yb)),
        "max_abs_diff": int(diff.max()),
        "mean_abs_diff": float(diff.float().mean()),
        "share_within_1": float((diff <= 1).float().mean()),
    }


def run(shards: str, img_size: int = 224, images: int = 1000) -> dict:
    """GPU host: DALI mixed (nvJPEG) against DALI CPU; CPU host: DALI CPU against PIL."""
    if torch.cuda.is_available():
        pair = (("dali", "cuda"), ("dali", "cpu"))
    else:
        pair = (("dali", "cpu"), ("webdataset", "cpu"))
    return compare(shards, *pair, img_size=img_size, limit=images)


def bench(args) -> dict:
    """`ffscale bench decode SHARDS --img-size --images`."""
    return run(args.shards, args.img_size, args.images)
