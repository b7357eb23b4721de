"""`ffscale compare`: what MLflow holds of the runs, side by side."""

from __future__ import annotations


def add_parser(sub) -> None:
    c = sub.add_parser("compare", help="compare stage runs tracked in MLflow (Table 1 layout)")
    c.add_argument("--runs", default="runs", help="run.dir whose mlflow.db to read (default: runs)")
    c.add_argument("--uri", help="tracking URI instead (default: $MLFLOW_TRACKING_URI or <runs>/mlflow.db)")
    c.add_argument("--experiment", default="ffscale")
    c.add_argument("--filter", help="MLflow search filter, e.g. \"params.\\`optim.base_lr\\` = '0.001'\"")
    c.add_argument("--model", help="only models whose name contains this")
    c.add_argument("--plot", metavar="FILE.png", help="draw loss and top-1 curves")
    c.set_defaults(fn=compare)


def compare(a) -> int:
    from ffscale.tools.compare import main

    return main(a)
