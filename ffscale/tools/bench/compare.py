"""`ffscale bench compare`: `ffscale compare` over many runs, timed against a client that fetches
run by run. It fills a fresh experiment of its own with N stage runs shaped like a pipeline's
(the config's params, the ffscale tags, latest metrics and a loss/top-1 history), then times,
best of `--rounds`:
- the table: `ffscale compare`'s query (one search request per 1,000 runs, filters on the server);
- the baseline: run ids from a search, then one `get_run` per run (a round trip each);
- `--model ff_`: a filter the server applies (a third of the runs);
- the curves (`--plot`): two metric histories per run, fetched 8 at a time, and one by one.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import uuid

from ffscale import config
from ffscale.tools.compare import stage_rows
from ffscale.tracking import store
from ffscale.tracking.store import flatten
from ffscale.util.secrets import redact

MODELS = ("ff_tiny", "vit_tiny", "attn_only_tiny")


def fill(uri: str, experiment: str, n: int, steps: int) -> float:
    """N stage runs in `experiment`; seconds it took."""
    c = store.client(uri)
    exp = store.experiment_id(c, experiment, uri)
    params = flatten(dataclasses.asdict(config.stages(config.load(None, []))[0].cfg))
    t0, now = time.perf_counter(), int(time.time() * 1000)
    for i in range(n):
        model = MODELS[i % len(MODELS)]
        tags = {"ffscale.kind": "stage", "ffscale.pipeline": f"bench-{i}", "ffscale.stage": "train",
                "ffscale.model": model, "ffscale.dataset": "train:bench"}  # fmt: skip
        rid = store.new_run(c, exp, f"bench-{i}/train", tags)
        hist = [("loss", 2.3 - 1.5 * s / steps, now + s, s) for s in range(1, steps + 1)]
        hist += [
            ("val_top1", 10 + 60 * s / steps, now + s, s) for s in range(steps // 10, steps + 1, steps // 10)
        ]
        hist += [("img_per_s", 1000.0 + i, now, steps), ("best_val_top1", 70.0, now, steps)]
        store.log_values(
            c, rid, params={**params, "model.name": model, "model.params": 5_700_000}, metrics=hist
        )
        store.end_run(c, rid, "FINISHED")
    return time.perf_counter() - t0


def best(fn, rounds: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def run(args) -> dict:
    tmp = None
    uri = args.uri
    if not uri:
        tmp = tempfile.TemporaryDirectory(prefix="ffscale-bench-compare-")
        uri = f"sqlite:///{tmp.name}/mlflow.db"
    experiment = f"ffscale-bench-compare-{uuid.uuid4().hex[:8]}"
    try:
        fill_s = fill(uri, experiment, args.runs, args.steps)

        def per_run():
            return store.runs_one_by_one(uri, [r.info.run_id for r in store.stage_runs(uri, experiment)])

        table_s, rows = best(lambda: stage_rows(uri, experiment), args.rounds)
        base_s, runs = best(per_run, args.rounds)
        model_s, some = best(lambda: stage_rows(uri, experiment, model="ff_"), args.rounds)
        wanted = [(r["run_id"], k) for r in rows for k in ("loss", "val_top1")]
        curves_s, hists = best(lambda: store.metric_histories(uri, wanted), args.rounds)
        serial_s, _ = best(lambda: store.metric_histories(uri, wanted, threads=1), args.rounds)
        store.delete_experiment(uri, experiment)
    finally:
        if tmp is not None:
            tmp.cleanup()
    assert len(rows) == len(runs) == args.runs and len(hists) == 2 * args.runs
    return {"uri": redact(uri), "runs": args.runs, "params_per_run": len(runs[0].data.params), "steps": args.steps,
            "fill_s": round(fill_s, 2), "table_s": round(table_s, 3), "per_run_s": round(base_s, 3),
            "speedup": round(base_s / table_s, 1), "model_filter_s": round(model_s, 3), "model_filter_runs": len(some),
            "curves_s": round(curves_s, 2), "curves_serial_s": round(serial_s, 2),
            "points": sum(len(h) for h in hists)}  # fmt: skip


def group(r: dict) -> str:
    """A record per kind of store (an MLflow server, a SQLite file), each shown with its newest."""
    return r["uri"].split(":", 1)[0]


def table(r: dict) -> list[list]:
    store = "SQLite file" if r["uri"].startswith("sqlite") else f"`mlflow server` at {r['uri']}"
    return [["store", "runs", "`ffscale compare`", "one `get_run` per run", "`--model ff_`",
             "`--plot` histories, 8 requests at a time (one by one)"],
            [store, r["runs"], f"{r['table_s']:.2f} s", f"{r['per_run_s']:.2f} s ({r['speedup']:.1f}x)",
             f"{r['model_filter_s']:.2f} s ({r['model_filter_runs']} runs)",
             f"{r['curves_s']:.1f} s ({r['curves_serial_s']:.1f} s)"]]  # fmt: skip


def print_compare(r: dict) -> None:
    print(f"{r['runs']} stage runs ({r['params_per_run']} params each) in one experiment at {r['uri']} "
          f"(filled in {r['fill_s']:.1f} s)")  # fmt: skip
    print(f"  ffscale compare (paged search):    {r['table_s']:.3f} s")
    print(f"  baseline, one get_run per run:     {r['per_run_s']:.3f} s  ({r['speedup']:.1f}x the table)")
    print(
        f"  --model ff_ (server-side filter):  {r['model_filter_s']:.3f} s for {r['model_filter_runs']} runs"
    )
    print(f"  --plot curves (2 histories a run): {r['curves_s']:.2f} s, {r['points']:,} points, 8 requests at a "
          f"time ({r['curves_serial_s']:.2f} s one by one)")  # fmt: skip
