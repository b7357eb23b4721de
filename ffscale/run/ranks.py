"""This node's ranks, started and seen through: the launcher `ffscale train` runs
(`python -m ffscale.run.ranks`; ffscale/run/launch.py starts it and forwards signals to the ranks).

It does for one node what DeepSpeed's `deepspeed/launcher/launch.py` does (DeepSpeed 0.19.8, `main`),
without importing DeepSpeed (and through it torch and MLflow): seconds on every start, every resume
and every requeue. Each rank runs `python -u ENTRY --local_rank=L ARGS` with the variables torch's
`env://` rendezvous and DeepSpeed's `init_distributed` read (MASTER_ADDR, MASTER_PORT, WORLD_SIZE,
RANK, LOCAL_RANK; torchrun's LOCAL_WORLD_SIZE) and DeepSpeed's launcher's own (CROSS_RANK, CROSS_SIZE, LOCAL_SIZE: the node's
index, the node count, the ranks per node). Global ranks are node-major: node n holds ranks
n * nproc ... n * nproc + nproc - 1, as launch.py's `global_rank_mapping` numbers them.

Unlike launch.py it leaves CUDA_VISIBLE_DEVICES as the node gave it (launch.py sets it to the
--world_info ids, which hides a scheduler's choice of GPUs); each rank takes device LOCAL_RANK of
those visible. When a rank fails, the others are sent SIGTERM and, still alive 30 s later, SIGKILL,
and the launcher exits with the failed rank's code, as launch.py's `sigkill_handler` does.
`deepspeed ffscale/train.py ...` launches (DeepSpeed's own runner and launch.py) work as before.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

STOP_GRACE_S = 30  # launch.py's terminate_process_tree: SIGTERM, then SIGKILL 30 s later


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ffscale.run.ranks", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, required=True, help="ranks on this node")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("entry", help="the script every rank runs (ffscale/train.py)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    return p.parse_args(argv)


def rank_env(args: argparse.Namespace, local_rank: int) -> dict[str, str]:
    return {
        **os.environ,
        "MASTER_ADDR": args.master_addr,
        "MASTER_PORT": str(args.master_port),
        "WORLD_SIZE": str(args.nnodes * args.nproc),
        "RANK": str(args.node_rank * args.nproc + local_rank),
        "LOCAL_RANK": str(local_rank),
        "CROSS_RANK": str(args.node_rank),
        "CROSS_SIZE": str(args.nnodes),
        "LOCAL_SIZE": str(args.nproc),
        "LOCAL_WORLD_SIZE": str(args.nproc),  # torchrun's name for it (ffscale/engine/dist.py reads it)
    }


def start(args: argparse.Namespace) -> list[subprocess.Popen]:
    """The node's ranks, in this process's group (a signal to the group reaches them all)."""
    return [
        subprocess.Popen(
            [sys.executable, "-u", args.entry, f"--local_rank={local_rank}", *args.args],
            env=rank_env(args, local_rank),
        )
        for local_rank in range(args.nproc)
    ]


def stop(ranks: list[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to the ranks still running; SIGKILL to those alive `grace_s` later."""
    for r in ranks:
        if r.poll() is None:
            r.terminate()
    deadline = time.monotonic() + grace_s
    for r in ranks:
        try:
            r.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.kill()
            r.wait()


# the one crash of this kind known to be caused by the data (docs/data.md, "DALI iterations")
CRASH_HINT = (
    "With data.loader=dali on a CPU, nvidia-dali 2.4.0's image decoder crashes so on an image it cannot "
    "decode once an iteration holds 32 or more: data.loader=webdataset names the image"
)


def see_through(ranks: list[subprocess.Popen], poll_s: float = 0.1) -> int:
    """0 once every rank ended with 0; a failed rank's code once the others are stopped: of the ranks
    found failed in the same poll (every `poll_s`), the lowest-numbered."""
    while True:
        codes = [r.poll() for r in ranks]
        failed = next((c for c in codes if c not in (None, 0)), None)
        if failed is not None:
            if failed == -signal.SIGSEGV:  # said before the others are stopped, which can take a while
                print(f"ffscale: rank {codes.index(failed)} of this node crashed in native code (SIGSEGV). {CRASH_HINT}",
                      file=sys.stderr, flush=True)  # fmt: skip
            stop(ranks)
            return failed if failed > 0 else 128 - failed  # killed by a signal: the shell's 128 + signal
        if all(c == 0 for c in codes):
            return 0
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    ranks: list[subprocess.Popen] = []
    got: list[int] = []

    def forward(signum, frame):  # signalled itself (not through the ranks): the ranks decide, as signalled
        got.append(signum)
        for r in ranks:
            if r.poll() is None:
                r.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    ranks += start(options)
    for signum in list(got):  # a signal that came while the ranks were being started reaches them all
        for r in ranks:
            if r.poll() is None:
                r.send_signal(signum)
    return see_through(ranks)


if __name__ == "__main__":
    sys.exit(main())
