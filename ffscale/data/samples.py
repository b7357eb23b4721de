"""One raw WebDataset sample (a dict of bytes) -> its label and image, or a DataError naming the
shard and key. Used by the webdataset loader and to locate a sample DALI failed on."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

from PIL import Image

from ffscale.data.manifest import Members
from ffscale.errors import DataError


def where(sample: dict) -> str:
    return f"shard {sample.get('__url__')} sample {sample.get('__key__')}"


def json_label(raw: bytes, key: str) -> int:
    """The integer `key` of a .json member; ValueError when there is none."""
    try:
        y = json.loads(raw)[key]
    except (KeyError, TypeError) as e:
        raise ValueError(f"no {key!r} field") from e
    if not isinstance(y, int):
        raise ValueError(f"{key} is not an integer")
    return y


def parse_label(sample: dict, num_classes: int, members: Members = Members()) -> int:
    """The sample's class from its `.cls` member, or from a field of its `.json` ("json:<field>")."""
    member, key = members.label_member, members.label_key
    raw = sample.get(member)
    if raw is None:
        raise DataError(f"{where(sample)}: no .{member} label")
    try:
        y = json_label(raw, key) if key else int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{where(sample)}: label {raw[:20]!r} is not an integer ({e})") from e
    if not 0 <= y < num_classes:
        raise DataError(f"{where(sample)}: label {y} out of range [0, {num_classes})")
    return y


def image_bytes(sample: dict, members: Members = Members()) -> bytes:
    exts = members.lower_exts
    data = next((sample[e] for e in exts if sample.get(e)), None)
    if not data:
        raise DataError(f"{where(sample)}: no image (.{'/.'.join(exts)}) or an empty one")
    return data


def decode_image(sample: dict, members: Members = Members()) -> Image.Image:
    data = image_bytes(sample, members)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        raise DataError(f"{where(sample)}: cannot decode image ({e})") from e
    return img


def iter_samples(files: list, counts: list[int] | None = None) -> Iterator[dict]:
    """Raw samples of the given shards, in order; a broken tar (or, given the manifest's `counts`,
    one that ends early) raises DataError naming it."""
    import webdataset as wds

    from ffscale.data.manifest import broken_tar

    src = wds.DataPipeline(
        wds.SimpleShardList([str(f) for f in files]), wds.tarfile_to_samples(handler=broken_tar)
    )
    yield from whole_shards(src, {str(f): n for f, n in zip(files, counts)}) if counts else src


def whole_shards(src: Iterator[dict], expect: dict[str, int]) -> Iterator[dict]:
    """Each shard read to its manifest count: Python's tarfile ends an archive silently at a
    damaged header past the first, which would drop the rest of the shard unnoticed."""
    url, n = None, 0
    for s in src:
        if s["__url__"] != url:
            _check(url, n, expect)
            url, n = s["__url__"], 0
        n += 1
        yield s
    _check(url, n, expect)


def _check(url: str | None, n: int, expect: dict[str, int]) -> None:
    if url is not None and n != expect.get(url, n):
        raise DataError(f"shard {url}: not a readable tar past sample {n} of {expect[url]} (damaged?)")
