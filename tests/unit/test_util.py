"""Leaves: the top-k counter, atomic writes, JSON-lines records, the one-line error report."""

from __future__ import annotations

import pytest
import torch

from ffscale import errors
from ffscale.util.atomic import atomic_path, write_atomic
from ffscale.util.topk import summarize, topk_counts


# -- evaluation counts, shard plans ---------------------------------------------------------
def test_topk_counts_skip_padding_and_sum_across_batches():
    ranks = torch.tensor([6.0, 5, 4, 3, 2, 1, 0])  # class c has the (c+1)-th highest logit
    logits = ranks.repeat(4, 1)
    y = torch.tensor([0, 3, 6, -1])  # top-1 hit, top-5 hit only, miss, padding
    sums = topk_counts(logits, y)
    assert sums[:3].tolist() == [3, 1, 2]
    assert sums[3].item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits[:3], y[:3], reduction="sum")
    )
    r = summarize(sums + topk_counts(logits[:1], y[:1]))
    assert (r["val_samples"], r["val_top1"], r["val_top5"]) == (4, 50.0, 75.0)


# -- atomic writes and error reporting -----------------------------------------------------------
def test_a_failed_write_leaves_the_previous_file(tmp_path):
    f = tmp_path / "latest"
    write_atomic(f, "step8")
    with pytest.raises(OSError), atomic_path(f) as tmp:
        tmp.write_text("ste")
        raise OSError("no space left on device")
    assert f.read_text() == "step8" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_a_row_is_never_glued_onto_a_line_a_kill_cut_short(tmp_path):
    """metrics.jsonl and config-history.jsonl (ffscale/util/jsonl.py): the appender cuts a cut tail
    off first; the reader skips a bad line (one left by an older appender) and keeps the rows after it."""
    from ffscale.util import jsonl

    rows = tmp_path / "metrics.jsonl"
    rows.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    jsonl.append(rows, {"step": 2, "loss": 1.5})
    assert rows.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    rows.write_text('{"step": 1, "lo{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    assert jsonl.read(rows) == [{"step": 2, "loss": 1.5}]
    cut = tmp_path / "history.jsonl"
    cut.write_text('{"step": 0, "con')  # a file of one cut line
    jsonl.append(cut, {"step": 0})
    assert jsonl.read(cut) == [{"step": 0}] and jsonl.read(tmp_path / "none.jsonl") == []


def test_errors_print_one_line_on_the_rank_that_should(capsys):
    assert errors.report(errors.ConfigError("optim.lrr: unknown"), rank=1) == 2
    assert capsys.readouterr().err == ""  # every rank has it: rank 0 says it
    assert errors.report(errors.ConfigError("optim.lrr: unknown"), rank=0) == 2
    assert capsys.readouterr().err == "ffscale: config error: optim.lrr: unknown\n"
    assert errors.report(errors.DataError("shard a.tar sample 3: bad"), rank=1) == 2  # found by this rank
    assert capsys.readouterr().err == "ffscale: data error: shard a.tar sample 3: bad\n"
    assert errors.guarded(lambda: (_ for _ in ()).throw(errors.Preempted("SIGTERM"))) == 143
    assert errors.CheckpointWriteError().exit_code == 1 and errors.CheckpointMismatch().exit_code == 2
