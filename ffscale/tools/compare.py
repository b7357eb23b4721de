"""`ffscale compare`: the stage runs in MLflow side by side, laid out like the paper's Table 1.
MLflow itself is reached through ffscale/tracking/store.py."""

from __future__ import annotations

import os
from pathlib import Path

from ffscale.tracking import store

# The paper's Table 1 (ImageNet-1k top-1), for reference beside ImageNet runs.
PAPER_TOP1 = {"ff_tiny": 61.4, "ff_base": 74.9, "ff_large": 71.4, "vit_base": 77.9}
FAMILY = (("ff_", "FF-only"), ("vit_", "ViT/DeiT"), ("attn_only_", "attention-only"))


def family(model: str) -> str:
    return next((name for prefix, name in FAMILY if model.startswith(prefix)), "other")


def stage_rows(uri: str, experiment: str, filter_string: str = "", model: str = "") -> list[dict]:
    """One row per stage run, from one search request per 1,000 runs (filters applied by the server)."""
    rows = []
    for r in store.stage_runs(uri, experiment, filter_string, model):
        m, p, t = r.data.metrics, r.data.params, r.data.tags
        end = r.info.end_time or r.info.start_time
        rows.append({
            "pipeline": t.get("ffscale.pipeline", "?"),
            "stage": t.get("ffscale.stage", "?"),
            "model": t.get("ffscale.model", "?"),
            "family": family(t.get("ffscale.model", "")),
            "params_m": float(p.get("model.params", "nan")) / 1e6,
            "dataset": t.get("ffscale.dataset", "?").split(":")[0],
            "img": p.get("model.img_size") if p.get("model.img_size") not in (None, "None") else p.get("data.img_size"),
            "epochs": p.get("schedule.epochs", "?"),
            "top1": m.get("best_val_top1", m.get("val_top1", float("nan"))),
            "top5": m.get("best_val_top5", m.get("val_top5", float("nan"))),
            "img_s": m.get("img_per_s", float("nan")),
            "wall_min": (end - r.info.start_time) / 60000,
            "status": r.info.status,
            "run_id": r.info.run_id,
        })  # fmt: skip
    order = {name: i for i, (_, name) in enumerate(FAMILY)}
    rows.sort(key=lambda r: (order.get(r["family"], 9), r["params_m"], r["pipeline"], r["stage"]))
    return rows


def format_table(rows: list[dict]) -> str:
    cols = [("family", "{}"), ("model", "{}"), ("params_m", "{:.2f}M"), ("pipeline", "{}"), ("stage", "{}"),
            ("dataset", "{}"), ("img", "{}"), ("epochs", "{}"), ("top1", "{:.2f}"), ("top5", "{:.2f}"),
            ("img_s", "{:.0f}"), ("wall_min", "{:.1f}"), ("status", "{}")]  # fmt: skip
    right = {"params_m", "img", "epochs", "top1", "top5", "img_s", "wall_min"}
    heads = {"params_m": "params", "img_s": "img/s", "wall_min": "min", "top1": "top-1", "top5": "top-5"}
    if not rows:
        return "no stage runs found"
    cells = [[f.format(r[c]) for c, f in cols] for r in rows]
    width = [max(len(heads.get(c, c)), *(len(row[i]) for row in cells)) for i, (c, _) in enumerate(cols)]

    def line(values):
        return " | ".join(
            v.rjust(w) if c in right else v.ljust(w) for (c, _), v, w in zip(cols, values, width)
        )

    lines = [line([heads.get(c, c) for c, _ in cols])]
    for r, row in zip(rows, cells):
        paper = PAPER_TOP1.get(r["model"]) if r["dataset"].lower() == "imagenet" else None
        lines.append(line(row) + (f"   (paper: {paper})" if paper else ""))
    return "\n".join(lines)


def plot(uri: str, rows: list[dict], path: Path, metric: str = "val_top1") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("loss", metric)
    hists = store.metric_histories(uri, [(r["run_id"], k) for r in rows for k in keys])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(rows):
        label = f"{r['pipeline']}/{r['stage']} ({r['model']})"
        for j, (ax, key) in enumerate(zip(axes, keys)):
            hist = hists[i * len(keys) + j]
            if hist:
                ax.plot(
                    [step for step, _ in hist],
                    [value for _, value in hist],
                    label=label,
                    marker="." if key != "loss" else None,
                )
    for ax, title in zip(axes, ("train loss", "validation top-1 (%)")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args) -> int:
    uri = args.uri or os.environ.get("MLFLOW_TRACKING_URI") or store.default_store(Path(args.runs))
    rows = stage_rows(uri, args.experiment, args.filter or "", args.model or "")
    print(format_table(rows))
    if args.plot and rows:
        plot(uri, rows, Path(args.plot))
        print(f"curves: {args.plot}")
    return 0 if rows else 1
