"""Labels as shards hold them: .cls digits parsed on the host and in DALI's graph alike."""

from __future__ import annotations

import pytest
import torch

from ffscale import errors
from ffscale.data.dali import parse_labels
from ffscale.data.samples import parse_label


# -- labels ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, expected",
    [(b"7", 7), (b"  12\n", 12), (b"0", 0)],
)
def test_cls_label_parses_ascii_digits(raw, expected):
    assert parse_label({"cls": raw, "__key__": "k", "__url__": "s.tar"}, 100) == expected


@pytest.mark.parametrize(
    "sample, message",
    [
        ({}, "no .cls label"),
        ({"cls": b"seven"}, "label b'seven' is not an integer"),
        ({"cls": b"100"}, r"label 100 out of range \[0, 100\)"),
        ({"cls": b"-1"}, "label -1 out of range"),
    ],
)
def test_bad_cls_labels_name_shard_and_key(sample, message):
    with pytest.raises(errors.DataError, match=rf"shard s.tar sample k: {message}"):
        parse_label({"__key__": "k", "__url__": "s.tar", **sample}, 100)


def test_dali_label_bytes_parse_like_the_host_parser():
    texts = [b"7", b"123", b" 42\n", b"0", b"x1", b"", b"1 2", b"99999999999999999"]
    raw = torch.zeros(len(texts), 16, dtype=torch.uint8)
    for i, t in enumerate(texts):
        raw[i, : min(len(t), 16)] = torch.tensor(list(t[:16]), dtype=torch.uint8)
    lengths = torch.tensor([len(t) for t in texts])
    assert parse_labels(raw, lengths).tolist() == [7, 123, 42, 0, -2, -2, -2, -2]
