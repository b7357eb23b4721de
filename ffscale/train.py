"""Training entry: `deepspeed ffscale/train.py --config configs/X.yaml key=value ...`.

Also runs under torchrun, or as a plain single process (`python -m ffscale.train ...`). Every rank
runs it; `ffscale train` (ffscale/cli/train.py) checks the job first and starts the launcher.
"""

from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    from ffscale import config

    p = argparse.ArgumentParser(
        prog="ffscale/train.py",
        description="Train (a pipeline of stages of) an FF-only / ViT model with DeepSpeed.",
        epilog="example: deepspeed --num_gpus 8 ffscale/train.py --config configs/ff_base.yaml "
        "optim.global_batch=2048 run.name=ffb",
    )
    config.add_args(p, allow_change=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    import os

    from ffscale.engine import preempt
    from ffscale.util import startup

    startup.mark("rank_created", created=True)  # `ffscale bench startup` (ffscale/util/startup.py)

    preempt.install()  # from the first moment: a SIGTERM during start-up is acted on once the engine is up
    if "LOCAL_RANK" in os.environ:  # a launcher's rank: it never outlives its launcher or its job
        from ffscale.util.lifeline import die_with_parent, watch_job

        die_with_parent()
        watch_job()
    args = parser().parse_args(argv)
    from ffscale import config
    from ffscale.errors import guarded, peer_gone

    def body() -> int:
        cfg = config.from_args(args)
        startup.mark("config_loaded")
        if args.print_config:
            print(config.to_yaml(cfg))
            return 0
        from ffscale import tracking
        from ffscale.engine.dist import prepare_env

        tracking.keep_mlflow_out(cfg, int(os.environ.get("RANK", "0")))
        prepare_env()
        from ffscale.run import pipeline

        # torch, DeepSpeed; MLflow where this rank uses it (DALI is imported with the loaders)
        startup.mark("imports_done")
        try:
            return pipeline.run(cfg)
        except RuntimeError as e:
            if gone := peer_gone(e):
                raise gone from None
            raise

    return guarded(body)


if __name__ == "__main__":
    from ffscale.util.hostenv import reexec_with_rank_env

    reexec_with_rank_env()  # CPU ranks started by a plain launcher: jemalloc, as `ffscale train` gives
    sys.exit(main())
