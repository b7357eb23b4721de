"""Bench figures kept as data (docs/results/, ffscale/tools/bench/results.py) and the docs' tables
made from them; the start-up marks and the part arithmetic of `ffscale bench startup`."""

import json
import re
import socket
import time
from argparse import Namespace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from ffscale.tools.bench import report, results, startup
from ffscale.util import startup as marks


def test_the_docs_tables_are_what_the_committed_records_make():
    repo = Path(__file__).resolve().parents[2]  # this checkout, whichever ffscale is installed
    checked = 0
    for doc in report.docs(repo):
        text = doc.read_text()
        new = report.update(text, repo / "docs" / "results")
        assert new == text, f"{doc}: run `ffscale bench report` (tables are not edited by hand)"
        checked += len(report.MARKED.findall(text))
    assert checked  # docs/performance.md's start-up table at least


def test_a_record_has_command_commit_date_machine_and_result(tmp_path):
    argv = ["bench", "example", "--gpus", "8", "--record"]  # a bench without a table of its own
    results.append("example", argv, {"rows": [{"gpus": 8, "gib": 1.25}]}, tmp_path)
    rec = results.append("example", argv, {"rows": [{"gpus": 8, "gib": 2.5}]}, tmp_path)
    kept = json.loads((tmp_path / "example.json").read_text())
    assert [r["result"]["rows"][0]["gib"] for r in kept] == [1.25, 2.5] and kept[-1] == rec  # appended
    assert set(rec) == {"command", "commit", "date", "machine", "result"}
    assert rec["command"] == "ffscale bench example --gpus 8 --record"
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", rec["commit"])
    date = datetime.fromisoformat(rec["date"])
    assert date.utcoffset() == timedelta(0) and abs(datetime.now(timezone.utc) - date) < timedelta(minutes=1)
    m = rec["machine"]
    assert {
        "cpu",
        "cores",
        "memory_gib",
        "gpu",
        "python",
        "torch",
        "deepspeed",
        "nvidia-dali",
        "mlflow",
    } <= set(m)
    assert m["cores"] >= 1 and m["memory_gib"] > 0 and m["torch"] and m["deepspeed"] and m["nvidia-dali"]
    assert socket.gethostname() not in json.dumps(rec)
    table = report.render("example", kept)
    assert "| rows.0.gib | 2.5 |" in table and rec["commit"][:7] in table and rec["command"] in table


def test_a_bench_recorded_in_kinds_shows_the_newest_record_of_each_kind():
    def rec(max_side, img_per_s, commit):
        row = {"workers": 1, "img_per_s": img_per_s, "spread_pct": 0.0, "ratio": 1.0}
        res = {
            "images": 10,
            "input": "x",
            "max_side": max_side,
            "same_digest": True,
            "digest": "d",
            "rows": [row],
        }
        machine = {"cpu": "c", "cores": 2, "memory_gib": 1, "gpu": "none", "python": "3"}
        return {"command": f"ffscale bench shard {commit}", "commit": commit * 40, "date": "2026-01-01T00:00:00+00:00",
                "machine": machine, "result": res}  # fmt: skip

    table = report.render("shard", [rec(0, 100, "a"), rec(256, 50, "b"), rec(0, 300, "c")])
    assert (
        "| 300 |" in table and "| 50 |" in table and "| 100 |" not in table
    )  # kept bytes' newest, resized's
    assert (
        table.index("bytes kept") < table.index("resized")
        and "commit ccccccc" in table
        and "commit aaaa" not in table
    )


def test_a_marked_block_is_rewritten_and_an_unrecorded_bench_says_so(tmp_path):
    text = "# T\n<!-- results:never -->\n| hand | edited |\n<!-- /results:never -->\nrest\n"
    new = report.update(text, tmp_path)
    assert "hand" not in new and "No record yet: `ffscale bench never --record`" in new
    assert new.startswith("# T\n<!-- results:never -->\n") and new.endswith("<!-- /results:never -->\nrest\n")
    assert report.update(new, tmp_path) == new


def test_mark_writes_nothing_without_the_variable_and_each_phase_once_with_it(tmp_path, monkeypatch):
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setattr(marks, "_marked", set())
    monkeypatch.delenv(marks.ENV, raising=False)
    marks.mark("imports_done")
    assert not trace.exists() and not marks._marked
    monkeypatch.setenv(marks.ENV, str(trace))
    monkeypatch.setenv("RANK", "1")
    before = time.time()
    for phase in ("imports_done", "imports_done", "rank_created"):
        marks.mark(phase, created=phase == "rank_created")
    done, created = (json.loads(ln) for ln in trace.read_text().splitlines())  # the repeat wrote nothing
    assert done["phase"] == "imports_done" and done["rank"] == 1 and before <= done["t"] <= time.time()
    # this process was created before the test began (to a clock tick)
    assert created["t"] <= before + 0.01 and "parent_t" not in created


def test_startup_parts_add_up_to_the_total_and_take_the_first_rank_created_and_the_last_rank_done():
    front = {"exec": 0.0, "ffscale_started": 0.1, "launcher_started": 5.0}
    rank0 = {"rank_created": 12.0, "config_loaded": 13.0, "imports_done": 16.0, "distributed_initialised": 17.0,
             "stage_started": 17.5, "loaders_built": 19.0, "model_built": 19.5, "engine_built": 23.0,
             "first_step": 25.0}  # fmt: skip
    lines = [{"phase": p, "t": t, "rank": None, "pid": 1} for p, t in front.items()]
    for rank, late in ((0, 0.0), (1, 0.5)):  # rank 1 is created and gets everywhere 0.5 s later
        lines += [{"phase": p, "t": t + late, "rank": rank, "pid": 10 + rank} for p, t in rank0.items()]
    p = startup.parts(startup.events(lines))
    assert p["total"] == 25.5 and p["launcher"] == 7.0
    assert p["rank_config"] == 13.5 - 12.0 and p["first_step"] == 2.0
    top = [k for k, *_ in startup.PARTS if k != "total" and "." not in k]
    assert sum(p[k] for k in top) == p["total"] and p["ffscale_own"] == pytest.approx(
        p["total"] - p["rank_imports"] - p["engine"]
    )
    assert p["front_end.python"] + p["front_end.checks"] == p["front_end"]
    res = startup.summary("ffscale train ...", [p, {k: 2 * v for k, v in p.items()}, p])
    total = res["parts"]["total"]
    assert (total["median_s"], total["min_s"], total["max_s"]) == (25.5, 25.5, 51.0)
    table = report.render("startup", [results.record(["bench", "startup", "--record"], res)])
    assert (
        "| the node's launcher (ffscale/run/ranks.py) starts the ranks | 7.00 | 7.00 | 14.00 | ffscale |"
        in table
    )
    for broken, lacking in ((lines[:-1], "first_step of rank 1"), (lines[1:], "exec")):
        try:
            startup.events(broken)
        except RuntimeError as e:
            assert lacking in str(e)
        else:
            raise AssertionError(f"a trace without {lacking} gave parts")


def test_startup_measures_the_demo_command_with_the_given_overrides():
    a = Namespace(config=[], nproc=2, overrides=["data.train=/d/train"])
    assert " ".join(startup.command(a)) == (
        "--nproc 2 --config configs/demo.yaml schedule.stop_at_step=1 tracking.enabled=false data.train=/d/train"
    )


def test_readmes_commands_are_read_from_their_closing_lines_and_a_failed_run_fails(tmp_path):
    import sys

    from ffscale.tools.bench import commands

    def timed(*lines: str, rc: int = 0):
        code = "".join(f"print({ln!r}); " for ln in lines) + f"raise SystemExit({rc})"
        return commands._timed([sys.executable, "-c", code], tmp_path)

    res = commands.tests(timed("...", "=== 3 passed, 1 skipped, 8 warnings in 61.50s (0:01:01) ==="))
    assert (res["passed"], res["failed"], res["skipped"], res["pytest_s"]) == (3, 0, 1, 61.5)
    assert res["wall_s"] >= 0 and "1 min 2 s" in commands.table(res)[1][2]
    res = commands.demo(
        timed("stage finetune: ...", "pipeline demo: done; final test top-1 86.02% (runs/demo)")
    )
    assert res["final_top1"] == 86.02 and commands.table(res)[1][2] == "86.02%"
    with pytest.raises(RuntimeError, match="exited 1"):
        timed("1 failed, 2 passed in 3.00s", rc=1)
    with pytest.raises(RuntimeError, match="no final top-1"):
        commands.demo(timed("pipeline demo: stopped"))


def test_a_bench_run_in_a_fresh_clone_records_the_commit_it_cloned():
    """The checkout's own state (uncommitted files, a commit made meanwhile) is no part of a bench that
    ran in a fresh clone of HEAD: its record names the clone's commit."""
    from ffscale.tools.bench import results

    given = {"wall_s": 1.0, results.CLONED: "ab" * 20}
    cloned = results.record(["bench", "demo", "--record"], given)
    assert cloned["commit"] == "ab" * 20 and cloned["result"] == {"wall_s": 1.0}
    assert given[results.CLONED] == "ab" * 20  # the caller's result is left as it was
    assert results.record(["bench", "unit"], {"wall_s": 1.0})["commit"] == results.commit()
