"""Labels as shards hold them: .cls digits, parsed on the host for both loaders."""

from __future__ import annotations

import pytest

from ffscale import errors
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
