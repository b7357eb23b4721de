"""The one reader and appender of JSON-lines records (a stage's metrics.jsonl and config-history.jsonl).

A row is appended as one whole line, so the only bad line a kill can leave is the last one, cut
short mid-append. The appender cuts such a tail off before it writes: a row is never glued onto a
cut one. The reader skips a bad line rather than stopping at it: after a cut tail every later line
is a complete row of a later append (and files written before the appender cut tails have the next
row glued onto the cut one, with every row after it intact); stopping would drop all of those. A cut
config change was never applied (the job died recording it, before training with it), so skipping
it is what the stage trained with too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ffscale.util.atomic import write_atomic


def read(path: Path) -> list[dict]:
    """Every complete row of the file, in order ([] when there is no file)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a kill mid-append
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def append(path: Path, row: dict) -> None:
    """`row` as the file's new last line, after cutting off a last line a kill left unfinished."""
    with open(path, "ab+") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                _cut_tail(f, size)
        f.write((json.dumps(row) + "\n").encode())


def rewrite(path: Path, rows: list[dict]) -> None:
    """The file as exactly `rows`, replaced whole (a kill leaves the old file or the new one)."""
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def _cut_tail(f, size: int) -> None:
    """Truncate an open file after its last newline (a file of one cut line becomes empty)."""
    block = 1 << 16
    end = size
    while end > 0:
        start = max(0, end - block)
        f.seek(start)
        newline = f.read(end - start).rfind(b"\n")
        if newline >= 0:
            f.truncate(start + newline + 1)
            return
        end = start
    f.truncate(0)
