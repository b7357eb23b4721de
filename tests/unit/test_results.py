"""Bench figures kept as data (docs/results/, ffscale/tools/bench/results.py) and the docs' tables
made from them."""

import json
import re
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ffscale.tools.bench import report, results


def test_the_docs_tables_are_what_the_committed_records_make():
    repo = Path(__file__).resolve().parents[2]  # this checkout, whichever ffscale is installed
    for doc in report.docs(repo):
        text = doc.read_text()
        new = report.update(text, repo / "docs" / "results")
        assert new == text, f"{doc}: run `ffscale bench report` (tables are not edited by hand)"


def test_a_record_has_command_commit_date_machine_and_result(tmp_path):
    argv = ["bench", "memory", "--gpus", "8", "--record"]
    results.append("memory", argv, {"rows": [{"gpus": 8, "gib": 1.25}]}, tmp_path)
    rec = results.append("memory", argv, {"rows": [{"gpus": 8, "gib": 2.5}]}, tmp_path)
    kept = json.loads((tmp_path / "memory.json").read_text())
    assert [r["result"]["rows"][0]["gib"] for r in kept] == [1.25, 2.5] and kept[-1] == rec  # appended
    assert set(rec) == {"command", "commit", "date", "machine", "result"}
    assert rec["command"] == "ffscale bench memory --gpus 8 --record"
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
    table = report.render("memory", kept)
    assert "| rows.0.gib | 2.5 |" in table and rec["commit"][:7] in table and rec["command"] in table


def test_a_marked_block_is_rewritten_and_an_unrecorded_bench_says_so(tmp_path):
    text = "# T\n<!-- results:never -->\n| hand | edited |\n<!-- /results:never -->\nrest\n"
    new = report.update(text, tmp_path)
    assert "hand" not in new and "No record yet: `ffscale bench never --record`" in new
    assert new.startswith("# T\n<!-- results:never -->\n") and new.endswith("<!-- /results:never -->\nrest\n")
    assert report.update(new, tmp_path) == new
