"""`ffscale bench data`: the DALI and webdataset loaders on the same shards, like for like.

Both loaders get the same augmentation switches (random-resized crop + flip to `img_size`; no
RandAugment or colour jitter, which only DALI has), the same number of decode workers, a warm-up,
and each round runs in a fresh process started with the environment training ranks get (the same
allocator: jemalloc on CPU hosts). Rounds alternate between the loaders, so drift on a shared machine
hits both; the median and the spread of the rounds are reported.

Per loader it also reports the CPU time per image of the rank process's Python threads (the
threads that contend for the GIL with the training step: the main thread and any `threading`
thread; DALI's native threads and the worker processes excluded), with the host resize apart; the
same again with the loader ahead of its consumer (which sleeps after each batch for a quarter more
than the loader takes per batch, as a training step would keep the rank busy: a loader that is
waited on costs the rank's thread more: DALI's wait for its outputs takes CPU); and the feed's
ceiling: the same workers reading the same samples with nothing decoded. DALI runs with
`--dali-batch` images per iteration (data.dali_batch), and again with one batch per iteration, the
baseline of that setting, in the same run: as it comes, then ahead of a step timed from its own
speed. DALI warms up in whole iterations.

The default input looks like ImageNet: real images (mosaics of Fashion-MNIST pictures, coloured)
stored as JPEGs of ImageNet's sizes (most 500x375 or 375x500, the rest 250-800 px a side), about
110 KB each, so decoding and resizing cost what they cost on ImageNet rather than on thumbnails.
"""

from __future__ import annotations

import io
import json
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

MARK = "FFSCALE_BENCH_DATA "
SOURCE = "imagenet-like mosaics of fashion-mnist, jpeg q95"  # the generator's version: a change regenerates
LOADERS = ("webdataset", "dali")
STEP_OVER_BATCH = 1.25  # the "loader ahead" round's step, over the loader's own time per batch


def imagenet_like_size(rng: random.Random) -> tuple[int, int]:
    """ImageNet's train set is mostly 500x375 / 375x500 (about two thirds), the rest spread out."""
    if rng.random() < 0.65:
        return (500, 375) if rng.random() < 0.75 else (375, 500)
    long_side = rng.randint(250, 800)
    aspect = rng.uniform(1.0, 1.8)
    short = max(200, int(long_side / aspect))
    return (long_side, short) if rng.random() < 0.7 else (short, long_side)


def mosaic_jpeg(pictures: np.ndarray, rng: random.Random, size: tuple[int, int], quality: int = 95) -> bytes:
    """A colour mosaic of real 28x28 pictures, each scaled to a random tile size: edges and texture
    at every scale, so the JPEG is as large as a photo's (~110 KB at ImageNet's sizes)."""
    from PIL import Image

    w, h = size
    tile = rng.choice((28, 35, 42))
    canvas = np.zeros((h, w, 3), np.uint8)
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            pic = Image.fromarray(pictures[rng.randrange(len(pictures))]).resize((tile, tile), Image.BILINEAR)
            tint = np.array([rng.uniform(0.35, 1.0) for _ in range(3)], np.float32)
            block = (np.asarray(pic, np.float32)[..., None] * tint).astype(np.uint8)
            canvas[y : y + tile, x : x + tile] = block[: h - y, : w - x]
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def imagenet_like_shards(out: Path, n: int, seed: int = 0) -> Path:
    """`n` ImageNet-like JPEGs from Fashion-MNIST's test pictures, sharded (cached in `out`)."""
    from ffscale.data.ingest import sources as shards
    from ffscale.data.ingest.writer import write_shards
    from ffscale.data.manifest import load_manifest

    source = f"{SOURCE}:{n}:{seed}"
    if (out / "manifest.json").is_file():
        have = load_manifest(out)[0].source
        if have == source or not have.startswith(SOURCE):  # this set, or shards of the user's own
            return out
    pictures, labels = shards.fashion_mnist_arrays("val")
    rng = random.Random(seed)
    items = []
    for i in range(n):
        size, r = imagenet_like_size(rng), random.Random(seed * 1_000_003 + i)
        items.append((lambda size=size, r=r: mosaic_jpeg(pictures, r, size), int(labels[i % len(labels)])))
    write_shards(shards.Source(source, shards.FASHION_MNIST_CLASSES, items), out, "bench", 250)
    return out


TARGET_PY_US_PER_IMG = 5.0  # issue 34: the rank process's Python threads per sample, at most


class PythonThreadCpu:
    """CPU seconds of this process's Python threads (the main thread and any `threading` thread: the
    ones that contend for the GIL), each read from its own clock (CLOCK_THREAD_CPUTIME_ID of its
    pthread, nanoseconds). DALI's native threads and the loaders' worker processes are not Python
    threads of this process and are not counted. `sample()` each batch: a thread is counted from
    the first time it is seen to the last."""

    def __init__(self):
        self.first: dict[tuple, float] = {}
        self.last: dict[tuple, float] = {}
        self.sample()

    def sample(self) -> None:
        for t in threading.enumerate():
            try:
                cpu = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
            except (OSError, TypeError):  # ended meanwhile
                continue
            key = (t.ident, t.native_id, t.name)
            self.first.setdefault(key, cpu)
            self.last[key] = cpu

    def seconds(self) -> float:
        return sum(self.last[k] - self.first[k] for k in self.last)

    def names(self) -> list[str]:
        return sorted({k[2] for k in self.last})


def _cpu_seconds() -> float:
    """CPU seconds so far of this process and every process under it: its own, those of children
    already waited for (RUSAGE_CHILDREN counts only those) and those of children alive now, so the
    difference of two calls is the CPU spent between them, by loader workers that live on (DALI's feed)
    as by those joined at an epoch's end (the DataLoader's)."""
    import psutil

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.NoSuchProcess:  # ended meanwhile
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def bench_cfg(
    kind: str,
    img_size: int,
    workers: int,
    scale: tuple[float, float] = (0.08, 1.0),
    rand_augment: bool = True,
    dali_batch: int | None = None,
):
    """The data config of a round: only `loader` differs between the two loaders. Augmentation is
    the recipe's per-image part, which both implement (random-resized crop of `scale` of the area,
    flip, bicubic resize, RandAugment); batch-level ops run on the device later. DALI decodes only the
    crop's region, PIL every pixel: `scale` 1 1 makes the crop the whole image, so both decode the
    same pixels."""
    from ffscale.config import DataCfg

    more = {} if dali_batch is None else {"dali_batch": dali_batch}
    return DataCfg(loader=kind, img_size=img_size, workers=workers, rand_augment=rand_augment, color_jitter=0.0,
                   mixup=0, cutmix=0, reprob=0, scale=list(scale), **more)  # fmt: skip


def measure(
    kind: str,
    root: str,
    img_size: int,
    batch: int,
    workers: int,
    warmup: int,
    scale,
    max_batches: int = 0,
    rand_augment: bool = True,
    feed_only: bool = False,
    step_s: float = 0.0,
    dali_batch: int | None = None,
) -> dict:
    """One round of one loader: an epoch (or `max_batches`) after `warmup` batches, in this process.
    `feed_only`: the loader's reads alone (same workers, nothing decoded), its ceiling. `step_s`: the
    consumer sleeps that long after each batch, as a training step would keep it busy. `dali_batch`:
    data.dali_batch (None: its default)."""
    import psutil  # noqa: F401  (imported here, not inside the timed window by _cpu_seconds)

    from ffscale.data.loader import build_loader
    from ffscale.util.hostenv import allocator

    cfg = bench_cfg(kind, img_size, workers, scale, rand_augment, dali_batch)
    dev = torch.device("cuda" if torch.cuda.is_available() and kind == "dali" else "cpu")
    torch.set_num_threads(1)  # the loaders' own workers/threads do the work; the consumer only counts
    loader, _ = build_loader(cfg, root, True, 0, 1, batch, 0, None, dev)
    per_run = getattr(loader, "per_run", 1)  # DALI's micro-batches per iteration: warm up in whole ones
    warmup = -(-warmup // per_run) * per_run
    if loader.steps_per_epoch < warmup + 2 * per_run:  # two iterations timed at least
        raise SystemExit(
            f"bench data: {root} gives {loader.steps_per_epoch} batches of {batch} ({per_run} per iteration): "
            f"too few to time {2 * per_run} after {warmup} of warm-up; more images, a smaller --batch or --dali-batch"
        )
    # the consumer's own work kept to a C getter: len() on a tensor runs torch's Python __len__, the
    # consumer's cost in this thread, not the loader's
    it = loader.read_only(0) if feed_only else (x.shape[0] for x, _ in loader.epoch(0))
    for _ in range(warmup):  # start-up (workers, pipeline build, first reads) is not throughput
        next(it)
        # at the step's pace too, so the timed window starts with the loader as far ahead as it
        # keeps itself, not with the queue a warm-up without steps has just emptied
        time.sleep(step_s)
    # the process tree's CPU read first and last, outside the Python threads' clocks: that scan is
    # the bench's own work, not the loader's
    c0 = _cpu_seconds()
    resized0 = getattr(loader, "host_resize_s", 0.0)
    threads, main0 = PythonThreadCpu(), time.thread_time()
    n, t0 = 0, time.perf_counter()
    for i, size in enumerate(it):
        n += size
        threads.sample()
        if step_s:
            time.sleep(step_s)
        if max_batches and i + 1 >= max_batches:
            break
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt, main = time.perf_counter() - t0, time.thread_time() - main0
    cpu = _cpu_seconds() - c0
    n = max(n, 1)
    return {
        "img_per_s": n / dt,
        "cpu_ms_per_img": 1000 * cpu / n,
        "py_threads_us_per_img": 1e6 * threads.seconds() / n,
        "main_thread_us_per_img": 1e6 * main / n,
        "host_resize_us_per_img": 1e6 * (getattr(loader, "host_resize_s", 0.0) - resized0) / n,
        # DALI: the rank thread's CPU building the loader's graph once, and making the epoch's
        # pipeline from it (ffscale/data/dali.py), both before the timed window
        "graph_build_cpu_s": getattr(loader, "graph_cpu_s", None),
        "pipeline_cpu_ms": _per_pipeline_ms(loader),
        "py_threads": threads.names(),
        "images": n,
        "iteration_images": getattr(loader, "run_batch", batch),
        "device": dev.type,
        "allocator": allocator(),
    }


def _round(
    kind: str, args, root: Path, feed_only: bool = False, step_s: float = 0.0, dali_batch: int = 0
) -> dict:
    """`measure` in a fresh process with the environment of a training rank."""
    from ffscale.util.hostenv import rank_env

    cmd = [sys.executable, "-m", __name__, kind, str(root), str(args.img_size), str(args.batch)]
    cmd += [
        str(args.workers),
        str(args.warmup),
        *map(str, args.crop_scale),
        str(int(not args.no_rand_augment)),
    ]
    cmd += [str(int(feed_only)), repr(step_s), str(dali_batch or args.dali_batch)]
    env = {**rank_env(), "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    found = [ln[len(MARK) :] for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if p.returncode or not found:
        raise RuntimeError(f"bench data round ({kind}) failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return json.loads(found[-1])


def bench_data(args) -> dict:
    from ffscale.data.dali import available

    root = imagenet_like_shards(Path(args.shards), args.images)  # the user's shards are used as they are
    kinds = [k for k in LOADERS if k != "dali" or available()]
    if getattr(args, "require_dali", False) and "dali" not in kinds:
        raise SystemExit(
            "bench data --require-dali: nvidia.dali does not import here (pip install nvidia-dali-cuda130)"
        )
    rounds: dict[str, list[dict]] = {k: [] for k in kinds}
    feeds: dict[str, list[dict]] = {k: [] for k in kinds}
    ahead: dict[str, list[dict]] = {k: [] for k in kinds}
    # DALI at one batch per iteration, the baseline of --dali-batch: as it comes, then ahead of a step
    one_batch: list[dict] = []
    one_batch_ahead: list[dict] = []
    for _ in range(args.rounds):
        for kind in kinds:
            rounds[kind].append(_round(kind, args, root))
            feeds[kind].append(_round(kind, args, root, feed_only=True))
            # a step a quarter longer than the loader takes per batch: the loader stays ahead, and the
            # rank's threads spend what they would beside training, not what waiting on a loader costs
            # (DALI's ShareOutputs takes the thread's CPU while it waits for a batch: docs/performance.md)
            step = STEP_OVER_BATCH * args.batch / rounds[kind][-1]["img_per_s"]
            ahead[kind].append(_round(kind, args, root, step_s=step))
            if kind == "dali":
                one_batch.append(_round(kind, args, root, dali_batch=args.batch))
                step = STEP_OVER_BATCH * args.batch / one_batch[-1]["img_per_s"]
                one_batch_ahead.append(_round(kind, args, root, step_s=step, dali_batch=args.batch))
    res: dict = {
        "shards": str(root),
        "rounds": args.rounds,
        "batch": args.batch,
        "crop_scale": list(args.crop_scale),
        "rand_augment": not args.no_rand_augment,
        "dali_batch": args.dali_batch or None,  # None: data.dali_batch's default
        "target_py_threads_us_per_img": TARGET_PY_US_PER_IMG,
        **_input_stats(root),
    }
    for kind, rs in rounds.items():
        ips = [r["img_per_s"] for r in rs]
        med = lambda key, of=rs: statistics.median(r[key] for r in of)  # noqa: E731
        res[kind] = {
            "img_per_s": statistics.median(ips),
            "img_per_s_min": min(ips),
            "img_per_s_max": max(ips),
            "cpu_ms_per_img": med("cpu_ms_per_img"),
            # the rank process's Python threads per image (GIL time the step competes with); the
            # host resize (CPU DALI without RandAugment) is torch's kernel, said apart
            "py_threads_us_per_img": med("py_threads_us_per_img"),
            "main_thread_us_per_img": med("main_thread_us_per_img"),
            "host_resize_us_per_img": med("host_resize_us_per_img"),
            "py_threads": rs[0]["py_threads"],
            "feed_img_per_s": med("img_per_s", feeds[kind]),
            "feed_py_threads_us_per_img": med("py_threads_us_per_img", feeds[kind]),
            "ahead_py_threads_us_per_img": med("py_threads_us_per_img", ahead[kind]),
            "ahead_host_resize_us_per_img": med("host_resize_us_per_img", ahead[kind]),
            "iteration_images": rs[0]["iteration_images"],
            "graph_build_cpu_s": _med_or_none("graph_build_cpu_s", rs),
            "pipeline_cpu_ms": _med_or_none("pipeline_cpu_ms", rs),
            "images": rs[0]["images"],
            "device": rs[0]["device"],
            "allocator": rs[0]["allocator"],
        }
    if "dali" in res:
        res["dali"]["one_batch_img_per_s"] = statistics.median(r["img_per_s"] for r in one_batch)
        res["dali"]["ahead_one_batch_py_threads_us_per_img"] = statistics.median(
            r["py_threads_us_per_img"] for r in one_batch_ahead
        )
        ratios = [d["img_per_s"] / w["img_per_s"] for d, w in zip(rounds["dali"], rounds["webdataset"])]
        res["ratio_dali_over_webdataset"] = res["dali"]["img_per_s"] / res["webdataset"]["img_per_s"]
        res["ratio_per_round"] = ratios
    return res


def _per_pipeline_ms(loader) -> float | None:
    made = getattr(loader, "builds", 0)
    return 1e3 * loader.pipelines_cpu_s / made if made else None


def _med_or_none(key: str, rounds: list[dict]):
    """The median of `key` over the rounds that report it; None where none does."""
    got = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(got) if got else None


def _input_stats(root: Path) -> dict:
    from ffscale.data.manifest import load_manifest

    m, files = load_manifest(root)
    return {
        "input_images": m.num_samples,
        "input_kb_per_image": sum(f.stat().st_size for f in files) / m.num_samples / 1024,
    }


def print_data(res: dict) -> None:
    print(
        f"{res['input_images']} images, {res['input_kb_per_image']:.0f} KB each on average ({res['shards']}); "
        f"{res['rounds']} rounds per loader, alternating; crops of {res['crop_scale']} of the area, bicubic, "
        f"RandAugment {'on' if res['rand_augment'] else 'off'}"
    )
    print(f"{'loader':11} {'img/s median':>12} {'min':>8} {'max':>8} {'CPU-ms/img':>10}  device, allocator")
    for kind in LOADERS:
        if kind in res:
            r = res[kind]
            print(
                f"{kind:11} {r['img_per_s']:>12,.0f} {r['img_per_s_min']:>8,.0f} {r['img_per_s_max']:>8,.0f} "
                f"{r['cpu_ms_per_img']:>10.2f}  {r['device']}, {r['allocator']}"
            )
    print(
        f"rank process's Python threads, CPU-us per image (target <= {res['target_py_threads_us_per_img']:g}; "
        "host resize apart), with the loader ahead of a step, and the feed alone (reads, no decode):"
    )
    for kind in LOADERS:
        if kind in res:
            r = res[kind]
            own = r["py_threads_us_per_img"] - r["host_resize_us_per_img"]
            ahead = r["ahead_py_threads_us_per_img"] - r["ahead_host_resize_us_per_img"]
            if kind == "dali":
                print(
                    f"{'':11} DALI iterations of {r['iteration_images']} images; at one batch per iteration "
                    f"{r['one_batch_img_per_s']:,.0f} img/s, ahead of a step {r['ahead_one_batch_py_threads_us_per_img']:.1f} us"
                )
                if r.get("graph_build_cpu_s") is not None:
                    print(
                        f"{'':11} the graph built once per loader in {r['graph_build_cpu_s']:.2f} CPU-s of the rank's "
                        f"thread; each epoch's pipeline made from it in {r['pipeline_cpu_ms']:.0f} CPU-ms"
                    )
            print(
                f"{kind:11} {own:>8.1f} us (main thread {r['main_thread_us_per_img']:.1f}, host resize "
                f"{r['host_resize_us_per_img']:.1f}; threads: {', '.join(r['py_threads'])}); ahead of a step "
                f"{ahead:.1f} us; feed alone {r['feed_img_per_s']:,.0f} img/s at "
                f"{r['feed_py_threads_us_per_img']:.1f} us"
            )
    if "ratio_dali_over_webdataset" in res:
        per = ", ".join(f"{x:.2f}" for x in res["ratio_per_round"])
        print(f"DALI / webdataset: {res['ratio_dali_over_webdataset']:.2f}x (rounds: {per})")


def group(res: dict) -> int:
    """Records by batch size, each shown with its newest (records before the key: the default, 64)."""
    return res.get("batch", 64)


def table(res: dict) -> list[list]:
    """The docs' table of a record (ffscale/tools/bench/report.py): a row per loader."""
    rows: list[list] = [["loader", "batch", "images per DALI iteration", "img/s (median)", "CPU-ms/img",
                         "rank's Python threads, CPU-us/img", "of it host resize",
                         "rank's Python threads, loader ahead of a step: CPU-us/img",
                         "the same, one batch per DALI iteration", "img/s, one batch per DALI iteration",
                         "feed alone: img/s",
                         "feed alone: CPU-us/img",
                         "DALI graph, built once per loader: CPU-s",
                         "DALI pipeline made per epoch: CPU-ms"]]  # fmt: skip
    for kind in LOADERS:
        if kind in res:
            r = res[kind]
            rows.append([kind, group(res), r.get("iteration_images", group(res)) if kind == "dali" else None,
                         round(r["img_per_s"]), r["cpu_ms_per_img"], r["py_threads_us_per_img"],
                         r["host_resize_us_per_img"], r.get("ahead_py_threads_us_per_img"),
                         r.get("ahead_one_batch_py_threads_us_per_img"),
                         round(r["one_batch_img_per_s"]) if "one_batch_img_per_s" in r else None,
                         round(r["feed_img_per_s"]), r["feed_py_threads_us_per_img"],
                         r.get("graph_build_cpu_s"), r.get("pipeline_cpu_ms")])  # fmt: skip
    return rows


if __name__ == "__main__":  # one round, in the process `_round` starts
    kind, root, img_size, batch, workers, warmup, lo, hi, ra, feed, step, dali_batch = sys.argv[1:13]
    r = measure(kind, root, int(img_size), int(batch), int(workers), int(warmup), (float(lo), float(hi)),
                rand_augment=ra == "1", feed_only=feed == "1", step_s=float(step),
                dali_batch=int(dali_batch) or None)  # fmt: skip
    print(MARK + json.dumps(r), flush=True)
