"""`ffscale bench data|train|memory|shard|scaling|plan|index|decode|compare|startup|startup-scale|verify|demo|suite|unit`:
throughput against a baseline measured in the same run, start-up time by part, or README's two commands timed (ffscale/tools/bench/), printed as a table or, with
--json, as JSON; with --record also kept in docs/results/<bench>.json, from which `ffscale bench report`
writes the docs' tables (ffscale/tools/bench/results.py)."""

from __future__ import annotations

import json
import os
import sys


def _show(res, args, table) -> int:
    print(json.dumps(res, indent=1)) if getattr(args, "json", False) else table(res)
    if getattr(args, "record", False):
        from ffscale.tools.bench import results

        results.append(args.what, sys.argv[1:], res)
        print(f"recorded in {results.path(args.what)}; `ffscale bench report` writes the docs' tables")
    return 0


# bench -> (what measures it, what prints its table), as "module:function", imported when it runs
BENCHES = {
    "data": ("ffscale.tools.bench.data:bench_data", "ffscale.tools.bench.data:print_data"),
    "train": ("ffscale.tools.bench.train:run", "ffscale.tools.bench.train:print_table"),
    "memory": ("ffscale.tools.bench.memory:memory", "ffscale.tools.bench.memory:print_memory"),
    "shard": ("ffscale.tools.bench.shard:bench_shard", "ffscale.tools.bench.shard:print_shard"),
    "scaling": ("ffscale.tools.bench.scaling:scaling", "ffscale.tools.bench.scaling:print_scaling"),
    "plan": ("ffscale.tools.bench.plan:measure", "ffscale.tools.bench.plan:print_plan"),
    "compare": ("ffscale.tools.bench.compare:run", "ffscale.tools.bench.compare:print_compare"),
    "decode": ("ffscale.tools.decode_check:bench", "json:dumps"),
    "startup": ("ffscale.tools.bench.startup:run", "ffscale.tools.bench.startup:print_table"),
    "startup-scale": ("ffscale.tools.bench.startup_scale:run", "ffscale.tools.bench.startup_scale:print_table"),
    "index": ("ffscale.tools.bench.index:bench_index", "ffscale.tools.bench.index:print_index"),
    "verify": ("ffscale.tools.bench.verify:run", "ffscale.tools.bench.verify:print_table"),
    "demo": ("ffscale.tools.bench.commands:run", "ffscale.tools.bench.commands:print_table"),
    "suite": ("ffscale.tools.bench.commands:run", "ffscale.tools.bench.commands:print_table"),
    "unit": ("ffscale.tools.bench.commands:run", "ffscale.tools.bench.commands:print_table"),
}  # fmt: skip


def _function(ref: str):
    import importlib

    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def run(args) -> int:
    """The bench `args.what`: measured, then shown as a table (or JSON) and recorded if asked."""
    measure, table = (_function(ref) for ref in BENCHES[args.what])
    if args.what == "decode":
        return _show(measure(args), args, lambda res: print(table(res)))
    return _show(measure(args), args, table)


def report(args) -> int:
    from ffscale.tools.bench.report import main

    return main(args)


def add_parser(sub) -> None:
    from ffscale import config

    b = sub.add_parser("bench", help="throughput against a baseline run in the same process")
    bsub = b.add_subparsers(dest="what", required=True)
    bd = bsub.add_parser(
        "data",
        help="DALI vs webdataset loader, like for like on ImageNet-like JPEGs: img/s, CPU-ms/img, ratio",
    )
    bd.add_argument(
        "--shards",
        default="data/bench-imagenet-like",
        help="shard dir (default: ImageNet-like JPEGs, made once)",
    )
    bd.add_argument("--images", type=int, default=3000, help="images in the generated set")
    bd.add_argument("--img-size", type=int, default=224)
    bd.add_argument("--batch", type=int, default=64, help="images per batch (DeiT's recipe: 128 per GPU)")
    bd.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers = DALI reader processes and threads"
    )
    bd.add_argument(
        "--rounds", type=int, default=3, help="rounds per loader, alternating, each a fresh process"
    )
    bd.add_argument("--warmup", type=int, default=5, help="batches per round not timed")
    bd.add_argument(
        "--dali-batch", type=int, default=0,
        help="data.dali_batch: images per DALI iteration (default: its default); the bench also runs DALI "
        "at one batch per iteration, loader ahead, as the baseline",
    )  # fmt: skip
    bd.add_argument(
        "--crop-scale", type=float, nargs=2, default=[0.08, 1.0], metavar=("LO", "HI"),
        help="random-resized-crop area (DeiT: 0.08 1); 1 1: both loaders decode every pixel",
    )  # fmt: skip
    bd.add_argument(
        "--no-rand-augment", action="store_true", help="without RandAugment (both loaders run it by default)"
    )
    bd.add_argument(
        "--require-dali",
        action="store_true",
        help="fail when DALI does not import (default: measure the rest)",
    )
    bd.add_argument("--json", action="store_true")
    bt = bsub.add_parser(
        "train", help="ffscale (DeepSpeed) step vs a plain PyTorch loop per ZeRO stage: ratio, MFU, memory"
    )
    config.add_args(bt)
    bt.add_argument("--nproc", type=int, default=1, help="ranks (plain reference: DDP when > 1)")
    bt.add_argument("--zero", default="0,2", help="ZeRO stages to measure, e.g. 0,1,2,3")
    bt.add_argument("--steps", type=int, default=10, help="steps per timed round")
    bt.add_argument("--warmup", type=int, default=3)
    bt.add_argument("--rounds", type=int, default=3, help="alternating plain/ffscale rounds; fastest kept")
    bt.add_argument("--json", action="store_true")
    bsh = bsub.add_parser("shard", help="sharding img/s with 1 and N writer processes on the same input")
    bsh.add_argument(
        "--root", help="a class-folder tree of your own (default: ImageNet-like JPEGs, made once)"
    )
    bsh.add_argument("--input", default="data/bench-shard-input", help="where the generated input is kept")
    bsh.add_argument("--images", type=int, default=2000, help="images in the generated input")
    bsh.add_argument(
        "--workers", type=int, default=len(os.sched_getaffinity(0)), help="N (default: all cores)"
    )
    bsh.add_argument("--shard-size", type=int, default=500)
    bsh.add_argument("--max-side", type=int, default=0, help="also downscale (e.g. 512)")
    bsh.add_argument("--rounds", type=int, default=3, help="alternating 1 / N rounds; best kept")
    bsh.add_argument("--tmp", help="where outputs are written (default: the system's temp dir)")
    bsh.add_argument("--json", action="store_true")
    bm = bsub.add_parser("memory", help="model states per GPU by ZeRO stage and GPU count; batch that fits")
    bm.add_argument("--models", default="ff_tiny,ff_base,ff_large,vit_base")
    bm.add_argument("--gpus", default="8,64,512")
    bm.add_argument("--img-size", type=int, default=224)
    bm.add_argument("--hbm-gib", type=float, default=80, help="GPU memory (H100: 80)")
    bm.add_argument("--json", action="store_true")
    bs = bsub.add_parser(
        "scaling", help="step time vs image size: FF (4 x tokens and fixed token MLP) and ViT"
    )
    bs.add_argument("--sizes", default="64,96,128,160,192,224")
    bs.add_argument("--dim", type=int, default=192, help="model width (small: this is about growth)")
    bs.add_argument("--depth", type=int, default=4)
    bs.add_argument("--token-hidden", type=int, default=256, help="fixed token-MLP width of the linear FF")
    bs.add_argument("--batch", type=int, default=16)
    bs.add_argument("--steps", type=int, default=3)
    bs.add_argument("--json", action="store_true")
    bdc = bsub.add_parser(
        "decode", help="the same shards through two decode paths (GPU: DALI mixed vs CPU; CPU: DALI vs PIL)"
    )
    bdc.add_argument("shards", help="shard directory")
    bdc.add_argument("--img-size", type=int, default=224)
    bdc.add_argument("--images", type=int, default=1000)
    bp = bsub.add_parser("plan", help="samples, steps and bytes each rank reads per epoch, by world size")
    bp.add_argument("--shards", help="a shard dir (default: ImageNet train's shapes)")
    bp.add_argument("--samples", type=int, default=1_281_167, help="without --shards: samples in the set")
    bp.add_argument(
        "--bytes-per-sample", type=int, default=111_000, help="without --shards: mean read per sample"
    )
    bp.add_argument("--val", type=int, default=50_000, help="val samples (default: ImageNet's)")
    bp.add_argument("--world", default="8,64,512,4096", help="world sizes")
    bp.add_argument("--repeats", type=int, default=3, help="data.repeats")
    bp.add_argument("--batch", type=int, default=128, help="micro-batch (paper: 128 per GPU)")
    bp.add_argument("--json", action="store_true")
    bi = bsub.add_parser(
        "index", help="opening a split's binary sample index: seconds and Private_Dirty memory per rank"
    )
    bi.add_argument("--samples", type=int, default=1_281_167, help="samples (default: ImageNet train's)")
    bi.add_argument("--shard-size", type=int, default=1250)
    bi.add_argument("--runs", type=int, default=5, help="fresh processes, each opening it once")
    bi.add_argument("--compare", action="store_true", help="also time building it from .idx text files")
    bi.add_argument("--tmp", help="where the synthetic split is written (default: the system's temp dir)")
    bi.add_argument("--json", action="store_true")
    bc = bsub.add_parser("compare", help="`ffscale compare` over N runs vs fetching run by run")
    bc.add_argument(
        "--uri", help="tracking URI, e.g. a server's http://host:5000 (default: a fresh SQLite store)"
    )
    bc.add_argument("--runs", type=int, default=200, help="stage runs in the experiment")
    bc.add_argument("--steps", type=int, default=100, help="loss values per run (and a tenth as many top-1)")
    bc.add_argument("--rounds", type=int, default=3, help="rounds per query; fastest kept")
    bc.add_argument("--json", action="store_true")
    bup = bsub.add_parser(
        "startup",
        help="`ffscale train` from exec to the end of the first optimizer step, part by part",
        description="Without --config: configs/demo.yaml. Always with schedule.stop_at_step=1 "
        "tracking.enabled=false (ffscale/tools/bench/startup.py).",
    )
    config.add_args(bup)
    bup.add_argument("--nproc", type=int, default=2, help="ranks")
    bup.add_argument("--rounds", type=int, default=3, help="timed runs after the warm-up; median, min, max")
    bup.add_argument("--warmup", type=int, default=1, help="untimed runs first (page cache, bytecode)")
    bup.add_argument("--json", action="store_true")
    bss = bsub.add_parser(
        "startup-scale",
        help="data set-up (plan, index, first batch) of N ranks at once: seconds, memory, opens per rank",
    )
    bss.add_argument("--ranks", default="1,8,32", help="world sizes, each started as that many processes")
    bss.add_argument("--samples", type=int, default=1_281_167, help="plan and index size (ImageNet train's)")
    bss.add_argument("--shard-size", type=int, default=1250)
    bss.add_argument("--images", type=int, default=1024, help="real JPEGs the first batch is read from")
    bss.add_argument("--small-shard-size", type=int, default=64)
    bss.add_argument("--batch", type=int, default=8, help="first batch's size")
    bss.add_argument("--tmp", help="where the splits are written (default: the system's temp dir)")
    bss.add_argument("--json", action="store_true")
    bv = bsub.add_parser("verify", help="checking a run's checkpoints before a resume: seconds, sha256 rate")
    bv.add_argument("run", help="a run directory with checkpoints (the error says how to make one)")
    bv.add_argument("--rounds", type=int, default=3, help="checks per setting; fastest kept")
    bv.add_argument("--json", action="store_true")
    for name, what in (("demo", "`bash scripts/demo.sh` in a fresh clone of HEAD: wall time, final top-1"),
                       ("suite", "`bash .ci/run` in a fresh clone of HEAD, as CI runs it: wall time, counts"),
                       ("unit", "`pytest tests/unit` in this checkout: wall time, counts")):  # fmt: skip
        bsub.add_parser(name, help=what).add_argument("--json", action="store_true")
    for name in BENCHES:
        bsub.choices[name].set_defaults(fn=run)
        bsub.choices[name].add_argument(
            "--record", action="store_true", help=f"also append the result to docs/results/{name}.json"
        )
    br = bsub.add_parser("report", help="write the docs' tables of figures from docs/results/*.json")
    br.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table is out of date")
    br.set_defaults(fn=report)
