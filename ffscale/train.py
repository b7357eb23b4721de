"""Training entry: `deepspeed ffscale/train.py --config configs/X.yaml key=value ...`.

Also runs under torchrun, or as a plain single process (`python -m ffscale.train ...`).
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: don't let ffscale/ shadow top-level modules
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ffscale/train.py",
        description="Train (a pipeline of stages of) an FF-only / ViT model with DeepSpeed.",
        epilog="example: deepspeed --num_gpus 8 ffscale/train.py --config configs/ff_base.yaml "
        "optim.global_batch=2048 run.name=ffb",
    )
    p.add_argument("--config", "-c", action="append", default=[], help="YAML file(s), merged in order")
    p.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. optim.base_lr=1e-3")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="resume a stage with a new value for KEY (recorded from the resumed step)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from ffscale import config
    from ffscale.errors import guarded, peer_gone

    def body() -> int:
        cfg = config.load(args.config, args.overrides + config.allow_change_overrides(args.allow_change))
        if args.print_config:
            print(config.to_yaml(cfg))
            return 0
        from ffscale.engine.dist import prepare_env

        prepare_env()
        from ffscale import pipeline

        try:
            return pipeline.run(cfg)
        except RuntimeError as e:
            if gone := peer_gone(e):
                raise gone from None
            raise

    return guarded(body)


if __name__ == "__main__":
    from ffscale.hostenv import reexec_with_rank_env

    reexec_with_rank_env()  # CPU ranks started by a plain launcher: jemalloc, as `ffscale train` gives
    sys.exit(main())
