"""`ffscale bench report`: the docs' tables of bench figures, written from docs/results/*.json.

A markdown file asks for a table with a pair of markers; everything between them is replaced by the
newest record of that bench (its figures, command, commit, date and machine):

    <!-- results:startup -->
    <!-- /results:startup -->

tests/unit/test_results.py checks that the committed docs are what this makes of the committed
records, so a figure edited by hand fails the suite.
"""

from __future__ import annotations

import re
from pathlib import Path

from ffscale.tools.bench import results

MARKED = re.compile(r"(<!-- results:(?P<bench>[\w-]+) -->\n).*?(<!-- /results:(?P=bench) -->)", re.S)


def docs(repo: Path = results.REPO) -> list[Path]:
    """The markdown files that may hold tables: README.md and docs/*.md."""
    return [p for p in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))] if p.is_file()]


def update(text: str, found: Path = results.RESULTS) -> str:
    """`text` with every marked block rewritten from the records under `found`."""
    return MARKED.sub(lambda m: m[1] + render(m["bench"], results.load(m["bench"], found)) + m[3], text)


def render(bench: str, records: list[dict]) -> str:
    if not records:
        return f"\nNo record yet: `ffscale bench {bench} --record` adds one (docs/results/{bench}.json).\n\n"
    shown = newest(bench, records)
    table = _tables().get(bench, flat)
    head, rows = None, []
    for rec in shown:
        h, *more = table(rec["result"])
        head, rows = head or h, rows + more
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    caption = _captions().get(bench)
    lead = f"{caption(shown[-1]['result'])}:\n\n" if caption else ""
    return "\n" + lead + "\n".join(lines) + "\n\n" + "\n\n".join(provenance(r) for r in shown) + "\n\n"


def newest(bench: str, records: list[dict]) -> list[dict]:
    """The records a table shows: the newest, or for a bench whose runs come in kinds (`_groups`), the
    newest of each kind, in the order the kinds were first recorded."""
    group = _groups().get(bench)
    if group is None:
        return records[-1:]
    last: dict = {}
    for rec in records:  # a key keeps the place of its first insertion when its value is replaced
        last[group(rec["result"])] = rec
    return list(last.values())


def provenance(rec: dict) -> str:
    sha, _, dirty = rec["commit"].partition("+")
    m = rec["machine"]
    software = ", ".join(f"{k} {m[k]}" for k in ("python", "torch", "deepspeed", "mlflow") if m.get(k))
    if m.get("nvidia-dali"):
        software += f", {m['nvidia-dali']}"
    return (
        f"`{rec['command']}` at commit {sha[:7]}{' (uncommitted changes)' if dirty else ''}, "
        f"{rec['date'].replace('T', ' ').replace('+00:00', ' UTC')}; {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB, GPU: {m['gpu']}; {software}."
    )


def flat(result) -> list[list]:
    """Any bench's result as key/value rows (a bench with its own layout is in `_tables`)."""
    rows: list[list] = [["key", "value"]]

    def walk(prefix: str, v) -> None:
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else None
        if items is None:
            rows.append([prefix, v])
            return
        for k, sub in items:
            walk(f"{prefix}.{k}" if prefix else str(k), sub)

    walk("", result)
    return rows


def _tables() -> dict:
    from ffscale.tools.bench import (
        commands,
        compare,
        data,
        memory,
        scaling,
        shard,
        startup,
        startup_scale,
        train,
        verify,
    )

    return {
        "data": data.table,
        "shard": shard.table,
        "scaling": scaling.table,
        "memory": memory.table,
        "compare": compare.table,
        "verify": verify.table,
        "startup": startup.table,
        "train": train.table,
        "startup-scale": startup_scale.table,
        "demo": commands.table,
        "suite": commands.table,
        "unit": commands.table,
    }


def _captions() -> dict:
    """The benches whose table needs a line above it (what was measured, beyond the command)."""
    from ffscale.tools.bench import scaling, train

    return {"train": train.caption, "scaling": scaling.caption}


def _groups() -> dict:
    """The benches recorded in kinds that the docs show side by side (e.g. two stores, two inputs)."""
    from ffscale.tools.bench import compare, data, shard

    return {"shard": shard.group, "compare": compare.group, "data": data.group}


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v).replace("|", "\\|")


def main(args) -> int:
    """Rewrite the docs' tables; with `check`, change nothing and fail when one is out of date."""
    stale = []
    for p in docs():
        text = p.read_text()
        new = update(text)
        if new != text:
            stale.append(p)
            if not args.check:
                p.write_text(new)
    for p in stale:
        print(f"{'out of date' if args.check else 'updated'}: {p.relative_to(results.REPO)}")
    return 1 if args.check and stale else 0
