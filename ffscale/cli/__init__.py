"""`ffscale`: one parser, one module per command group, each adding its commands with `add_parser`
and a handler that imports what the command needs when it runs (so `ffscale --help` is fast)."""

from __future__ import annotations

import argparse
import sys

from ffscale.cli import bench, data, model, ops, track, train
from ffscale.util import startup

GROUPS = (data, train, model, track, ops, bench)  # the order `ffscale --help` lists them in


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ffscale",
        description="Distributed training of feed-forward-only vision transformers (DeepSpeed, DALI, MLflow).",
        epilog="quick start: bash scripts/demo.sh | docs: README.md, cluster/README.md, docs/",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    startup.mark("ffscale_started")  # `ffscale bench startup`: python and ffscale.cli are loaded
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides after an option (`--allow-change k a.b=1`): argparse leaves them over
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from ffscale.errors import guarded

    return guarded(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
