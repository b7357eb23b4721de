"""NVIDIA DALI pipelines: nvJPEG/hardware decode on the GPU (`device="mixed"`), the same graph on
the CPU where there is no GPU. The only module that knows DALI.

The rank's samples are read in the SamplePlan's order by the loader's worker processes
(`data.workers`, at least one; ffscale/data/feed.py) into shared memory, and DALI's external source
takes each batch whole without a copy: the reads and label checks hold no GIL of the rank process,
and nothing there runs per sample (`ffscale bench data` measures what does). DALI's own webdataset
reader cannot take the plan's order: it shards by contiguous ranges of samples and shuffles only
inside an `initial_fill` buffer.

Each DALI iteration takes `per_run` micro-batches at once (`data.dali_batch` images, in whole
micro-batches, at most an epoch's), and the loader hands them on one micro-batch at a time: most of
what an iteration costs the rank's thread (feeding the source, launching the graph, taking the
outputs) does not grow with its images, so larger iterations spread it thinner. An epoch's last
iteration is filled up with padding rows that are never handed on.

Training runs one pipeline per epoch, seeded from (seed, epoch, rank): an epoch's batches are a
pure function of those and of `per_run`. The graph is built once per loader and serialized, and each
epoch's pipeline is made from it with the epoch's seed: building RandAugment's graph runs DALI's
AutoGraph over nvidia.dali.auto_aug in the rank's thread, seconds of its CPU under the GIL, while
a pipeline made from the serialized graph draws as one built afresh with that seed
(tests/integration/test_data.py holds that). DALI's random operators draw from one stream per operator
and position in the iteration, whose use depends on the images (a crop window is drawn again until
it fits), so a resumed epoch runs the iterations it skips through the pipeline and drops their
batches, as the uninterrupted run drew them.
Evaluation has no random operator: its pipeline is built once per loader and reset for every
evaluation (the model's and the EMA's), and every batch has exactly `batch` rows (the last padded
with label -1), so a compiled model sees one shape.
"""

from __future__ import annotations

import functools
import io
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ffscale.config import DataCfg
from ffscale.data.feed import HEADER, BatchFeed, FeedWorkers
from ffscale.data.plan import Batch, Loader, SamplePlan
from ffscale.data.samples import decode_image
from ffscale.data.tarindex import TarIndex
from ffscale.errors import DaliFailure, DataError, FfscaleError
from ffscale.util.seeds import derive31


def version() -> str:
    import nvidia.dali

    return nvidia.dali.__version__


def available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def _pipeline(train, c: DataCfg, rand_aug: bool, decode_device: str, host_resize: bool):
    from nvidia.dali import fn, pipeline_def, types

    from ffscale.data import randaug

    interp = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}[c.interpolation]

    # AutoGraph (DALI's conditionals) only for a graph with data-dependent ifs, RandAugment's choice of
    # operations (nvidia.dali.auto_aug needs it): it rewrites this function on every build, CPU time
    # and a generated file in the temp directory each time, for graphs that are the same without it
    @pipeline_def(enable_conditionals=bool(train and rand_aug))
    def pipe():
        # the rank's samples in the plan's order, read by the loader's workers (feed.BatchFeed)
        jpg, label = _images()
        if train:
            img = fn.decoders.image_random_crop(
                jpg, device=decode_device, output_type=types.RGB, random_area=list(c.scale),
                random_aspect_ratio=list(c.ratio),
            )  # fmt: skip
            if c.color_jitter > 0 and not rand_aug:  # timm drops colour jitter under RandAugment
                j = [max(0.0, 1 - c.color_jitter), 1 + c.color_jitter]
                img = fn.color_twist(
                    img, brightness=fn.random.uniform(range=j), contrast=fn.random.uniform(range=j),
                    saturation=fn.random.uniform(range=j),
                )  # fmt: skip
            if host_resize:  # the crops, their flips and labels; resized in torch (DaliLoader._resize)
                return img, label, fn.random.coin_flip(probability=c.hflip)
            img = fn.resize(img, resize_x=c.img_size, resize_y=c.img_size, interp_type=interp)
            if rand_aug:  # DeiT's rand-m9-mstd0.5-inc1 at timm's magnitudes; filled with the mean grey
                img = randaug.rand_augment(img, c.img_size, fill=round(255 * sum(c.mean) / len(c.mean)))
            mirror = fn.random.coin_flip(probability=c.hflip)
        else:
            img = fn.decoders.image(jpg, device=decode_device, output_type=types.RGB)
            img = fn.resize(img, resize_shorter=int(c.img_size / c.crop_pct), interp_type=interp)
            mirror = 0
        img = fn.crop_mirror_normalize(
            img, dtype=types.UINT8, output_layout="CHW", crop=(c.img_size, c.img_size), mirror=mirror
        )
        return img, label

    return pipe


ROWS = "rows"  # the graph's external source, fed one iteration at a time (`_fed_pipeline`)


def _images():
    """The batches a feed hands over -> (encoded images, int64 labels), in the graph: each row's
    header read (ffscale/data/feed.py) and its image cut to its length."""
    from nvidia.dali import fn, types

    rows = fn.external_source(name=ROWS, batch=True, no_copy=True, dtype=types.UINT8)
    length = fn.reinterpret(fn.slice(rows, start=[0], shape=[4], axes=[0]), dtype=types.INT32)
    label = fn.reinterpret(fn.slice(rows, start=[8], shape=[8], axes=[0]), dtype=types.INT64)
    return fn.slice(rows, start=[HEADER], shape=length, axes=[0]), label


def _fed_pipeline(graph: bytes, feed: BatchFeed, **params):
    """A pipeline made from the serialized `graph`, `feed` called for each iteration's rows. `params`:
    the Pipeline's; the executor is given as a built one has it by default, which deserializing
    does not keep (nvidia-dali 2.4.0 pipeline.py `deserialize`: every exec_* flag False otherwise)."""
    pipe = _fed_class().deserialize(graph, exec_pipelined=True, exec_async=True, exec_dynamic=True, **params)
    pipe.feed = feed  # before its first run, the first call of iter_setup
    return pipe


@functools.cache
def _fed_class():
    """nvidia.dali's Pipeline, fed by its `feed` before each iteration (defined at first use: DALI is
    imported only where it runs)."""
    from nvidia.dali.pipeline import Pipeline

    class Fed(Pipeline):
        feed: BatchFeed

        def iter_setup(self):  # before each iteration; StopIteration from the feed ends the epoch
            # the array itself, not a TensorListCPU built here (which skips the checks and conversion
            # of nvidia-dali 2.4.0's external_source.py `_prep_data_for_feed_input`): with one, a
            # training graph's iteration took the rank's thread twice the CPU (`ffscale bench data`,
            # the records of commit 080cbd5 in docs/results/data.json)
            self.feed_input(ROWS, self.feed())

    return Fed


def _serialized(pipe) -> bytes:
    """The graph of the unbuilt pipeline `pipe`, serialized; `pipe` is let go."""
    try:
        return pipe.serialize()
    finally:
        _release(pipe)


def start_method() -> str:
    """How the feed's workers start: "fork" unless CUDA is initialised in this process, then
    "spawn": forking a process that holds a CUDA context is unsupported (as nvidia-dali 2.4.0 says
    of its own workers: nvidia/dali/pipeline.py, Pipeline's `py_start_method` docstring)."""
    return "spawn" if torch.cuda.is_available() and torch.cuda.is_initialized() else "fork"


class DaliLoader(Loader):
    # batches the feed's workers read ahead of the pipeline, so storage latency overlaps decoding
    # and the step
    READ_AHEAD = 2
    QUEUE = 2  # the pipeline's own prefetch_queue_depth
    # the feed's shared-memory slots: a slot is written again only after DALI has let go of it
    # (ffscale/data/feed.py, "Reuse")
    SLOTS = READ_AHEAD + QUEUE + 2

    def __init__(self, cfg: DataCfg, plan: SamplePlan, index: TarIndex, train: bool, batch: int,
                 num_classes: int, device: torch.device):  # fmt: skip
        if cfg.on_error == "skip":
            raise DataError(
                "data.on_error=skip needs data.loader=webdataset: DALI cannot drop a sample inside its "
                "graph (data.loader=auto picks webdataset for skip)"
            )
        super().__init__(cfg, plan, index, train, batch, num_classes, device)
        # micro-batches per DALI iteration, and its images
        self.per_run = max(1, min(cfg.dali_batch // batch, self.steps_per_epoch))
        self.run_batch = self.per_run * batch
        self.builds = 0  # pipelines made by this loader (evaluation: one, however many epochs)
        # this thread's CPU building the graph and making pipelines from it (`ffscale bench data`)
        self.graph_cpu_s = self.pipelines_cpu_s = 0.0
        self._graphs: dict[bool, bytes] = {}  # the serialized graph, by whether it resizes on the host
        self.host_resize_s = 0.0  # this thread's CPU in the host resize (`ffscale bench data` says it apart)
        self._val = None  # the evaluation's (pipeline, iterator, feed), kept between evaluations
        self._workers: FeedWorkers | None = None
        self._val_whole = False  # the last evaluation ran to its end, so a reset starts the next

    def _feed_workers(self) -> FeedWorkers:
        """The loader's feed workers, started at its first epoch and kept until `close`."""
        if self._workers is None:
            self._workers = FeedWorkers(
                self.index, self.num_classes, self.run_batch, self.cfg.workers,
                slots=self.SLOTS, start_method=start_method(),
            )  # fmt: skip
        return self._workers

    def _feed(self, ids: np.ndarray) -> BatchFeed:
        """The feed of an epoch's (or an evaluation's) samples `ids`, in the plan's order, followed by
        padding up to whole DALI iterations that cover `steps_per_epoch` micro-batches."""
        runs = -(-self.steps_per_epoch // self.per_run)
        rows = np.zeros(runs * self.run_batch, dtype=np.int64)  # ids: at most steps_per_epoch batches
        rows[: len(ids)] = ids
        return BatchFeed(self._feed_workers(), rows, len(ids), self.READ_AHEAD)

    def _params(self, seed: int) -> dict:
        gpu = self.device.type == "cuda"
        return dict(batch_size=self.run_batch, num_threads=max(1, self.cfg.workers),
                    device_id=self.device.index or 0 if gpu else None, seed=seed,
                    prefetch_queue_depth=self.QUEUE)  # fmt: skip

    def _graph(self, host_resize: bool) -> bytes:
        """The loader's graph, built once and serialized."""
        if host_resize not in self._graphs:
            decode = "mixed" if self.device.type == "cuda" else "cpu"
            rand_aug = self.cfg.rand_augment and self.train
            cpu0 = time.thread_time()
            pipe = _pipeline(self.train, self.cfg, rand_aug, decode, host_resize)(**self._params(0))
            self._graphs[host_resize] = _serialized(pipe)
            self.graph_cpu_s += time.thread_time() - cpu0
        return self._graphs[host_resize]

    @property
    def graph_builds(self) -> int:
        """Graphs built (AutoGraph and all): one per loader."""
        return len(self._graphs)

    def _build(self, source: BatchFeed, seed: int, host_resize: bool):
        graph = self._graph(host_resize)
        cpu0 = time.thread_time()
        pipe = _fed_pipeline(graph, source, **self._params(seed))
        self.builds += 1
        self.pipelines_cpu_s += time.thread_time() - cpu0
        return pipe

    def _host_resize(self) -> bool:
        # On a CPU torch's uint8 SIMD resize is the faster (docs/performance.md, "Input pipeline").
        return self.train and self.device.type != "cuda" and not self.cfg.rand_augment

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        # One generator between the step and its batches, the iteration's micro-batches handed on by
        # `yield from`: each level of generators costs the rank's thread a resume per micro-batch,
        # on caches the step has just filled with its own work.
        return self._train_epoch(epoch, skip) if self.train else self._eval_epoch()

    def _train_epoch(self, epoch: int, skip: int) -> Iterator[Batch]:
        """The epoch's batches after the `skip` first (run through the pipeline, dropped)."""
        ids = self.plan.epoch_ids(epoch, True, self.batch)  # whole batches
        if not len(ids):
            return
        host = self._host_resize()
        source = self._told(lambda: self._feed(ids), ids, 0)
        seed = derive31(self.plan.seed, "dali", epoch, self.plan.rank)
        try:
            pipe = self._told(lambda: self._build(source, seed, host), ids, 0)
        except BaseException:
            source.drain()
            raise
        try:
            if host:
                iterations = self._host_batches(pipe, skip)
            else:
                iterations = self._dali_batches(self._told(lambda: _iterator(pipe), ids, 0), skip)
            for batches in self._guarded(iterations, ids):
                yield from batches
        finally:
            _release(pipe)
            source.drain()

    def _eval_epoch(self) -> Iterator[Batch]:
        """Every sample of the rank once, padded to `steps_per_epoch` whole batches, through the one
        evaluation pipeline (reset after a whole evaluation; rebuilt after an abandoned one)."""
        ids = self.plan.eval_indices()
        if not self.steps_per_epoch:
            return
        source = self._val[2] if self._val is not None else None
        try:
            if self._val is not None and self._val_whole:
                self._val_whole = False
                self._told(self._val[1].reset, ids, 0)
            else:
                self._drop_val()
                source = self._told(lambda: self._feed(ids), ids, 0)
                self._val = (None, None, source)
                pipe = self._told(lambda: self._build(source, 0, False), ids, 0)
                self._val = (pipe, None, source)
                self._val = (pipe, self._told(lambda: _iterator(pipe), ids, 0), source)
            for batches in self._guarded(self._dali_batches(self._val[1], 0), ids):
                yield from batches
        except BaseException:  # a failure, or an evaluation abandoned midway: no reset resumes it
            if self._val is not None and self._val[2] is source:  # not a newer evaluation's (a late close)
                self._drop_val()
            raise
        self._val_whole = True

    def _drop_val(self) -> None:
        """The evaluation pipeline stopped and its feed drained (an evaluation abandoned midway:
        its pipeline cannot be reset)."""
        if self._val is not None:
            pipe, _, feed = self._val
            if pipe is not None:
                _release(pipe)
            feed.drain()
        self._val, self._val_whole = None, False

    def close(self) -> None:
        """Stops the evaluation pipeline and the feed's workers (the stage is over)."""
        self._drop_val()
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def _parts(self):
        """(micro-batch number, its place in the iteration) for each micro-batch an iteration holds,
        up to the epoch's last."""
        for start in range(0, self.steps_per_epoch, self.per_run):
            last = min(start + self.per_run, self.steps_per_epoch)
            yield [(n, n - start) for n in range(start, last)]

    def _dali_batches(self, it, skip: int) -> Iterator[list[Batch]]:
        """Each iteration's micro-batches, those before micro-batch `skip` left out."""
        b = self.batch
        # `it` first: it ends where the feed ends, so a reset of the evaluation's iterator restarts both
        for out, parts in zip(it, self._parts()):
            # the iteration's micro-batches as views, made at once (one call each, not one per batch)
            xs, ys = out[0]["x"].split(b), out[0]["y"].view(-1).cpu().split(b)
            yield [(xs[k], ys[k]) for n, k in parts if n >= skip]

    def _host_batches(self, pipe, skip: int) -> Iterator[Iterator[Batch]]:
        """Each iteration's micro-batches as they are resized, those before `skip` left out."""
        for parts in self._parts():
            try:
                img, label, mirror = pipe.run()
            except StopIteration:
                return
            y, flips = torch.from_numpy(label.as_array()).view(-1), mirror.as_array()
            yield self._resized(img, flips, y, [k for n, k in parts if n >= skip])

    def _resized(self, img, flips, y, places: list[int]) -> Iterator[Batch]:
        b = self.batch
        for k in places:
            yield self._resize(img, flips, k * b, (k + 1) * b), y[k * b : (k + 1) * b]

    def _guarded(self, iterations: Iterator, ids: np.ndarray) -> Iterator:
        """`iterations` with DALI's and the workers' failures said as DataError or DaliFailure."""
        n = 0
        while True:
            try:
                got = next(iterations, _END)
            except Exception as e:
                self._say(e, ids, n * self.per_run)
            if got is _END:
                return
            n += 1
            yield got

    def _told(self, call, ids: np.ndarray, batch: int):
        """call(), with a failure said by `_say`."""
        try:
            return call()
        except Exception as e:
            self._say(e, ids, batch)

    def _say(self, e: Exception, ids: np.ndarray, batch: int):
        """Raises the failure `e` (being handled, at or before micro-batch `batch`) as the line that
        names its cause: a bad sample a worker read (its DataError, raised by the feed as it is), a
        decode error located on the host, or DALI itself failing."""
        if isinstance(e, FfscaleError) or not isinstance(e, RuntimeError):
            raise e
        what = dali_error_line(str(e))
        if not is_data_error(str(e)):  # the driver, CUDA, nvJPEG, memory: said at once
            raise DaliFailure(
                f"DALI failed on {self.device} (not a data error): {what}. Train without DALI with "
                "data.loader=webdataset"
            ) from None
        self._locate(ids, batch, what)

    def _resize(self, crops, mirror, lo: int, hi: int) -> torch.Tensor:
        """The decoded crops lo..hi-1 (HWC uint8) to img_size (data.interpolation, antialiased), each
        flipped as drawn."""
        size, mode = self.cfg.img_size, self.cfg.interpolation
        cpu0 = time.thread_time()
        out = torch.empty(hi - lo, 3, size, size, dtype=torch.uint8)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one small image each: DALI's threads are decoding the next batch
        try:
            for i in range(lo, hi):
                t = torch.from_numpy(np.asarray(crops[i])).permute(2, 0, 1).unsqueeze(0)  # channels-last view
                r = F.interpolate(t, size=(size, size), mode=mode, antialias=True, align_corners=False)
                out[i - lo] = r[0].flip(-1) if mirror[i] else r[0]
        finally:
            torch.set_num_threads(threads)
            self.host_resize_s += time.thread_time() - cpu0
        return out

    def read_only(self, epoch: int) -> Iterator[int]:
        """The feed alone (`ffscale bench data`'s ceiling): the epoch's samples read by the same
        worker processes, in the same iterations, into a pipeline that decodes nothing; yields each
        micro-batch's size."""
        from nvidia.dali import pipeline_def

        source = self._feed(self.plan.epoch_ids(epoch, self.train, self.batch))
        params, pipe = {**self._params(0), "device_id": None}, None
        try:
            pipe = _fed_pipeline(_serialized(pipeline_def(_images)(**params)), source, **params)
            for parts in self._parts():
                pipe.run()
                yield from (self.batch for _ in parts)
        finally:
            if pipe is not None:
                _release(pipe)
            source.drain()

    def _locate(self, ids: np.ndarray, batch: int, what: str):
        """DALI's decode errors carry no file name: decode, on the host, the samples of the iteration
        that holds micro-batch `batch` and those DALI may have been working ahead on, and raise naming
        the one that fails."""
        run, ahead = batch // self.per_run, self.QUEUE + self.READ_AHEAD + 1
        for j in ids[run * self.run_batch : (run + ahead) * self.run_batch]:
            decode_image(self.index.read(int(j)), self.index.members)  # raises DataError naming it
        raise DataError(f"DALI failed near batch {batch} under {Path(self.index.files[0]).parent}: {what}")


_END = object()


def _release(pipe) -> None:
    """The pipeline stopped now, in this thread, not when the garbage collector gets to it (a
    pipeline held in a reference cycle, as a traceback's frames hold one, is freed wherever a
    collection runs next; nvidia-dali 2.4.0: pipeline.py `__del__` -> `_shutdown`, idempotent)."""
    pipe._shutdown()


def _iterator(pipe):
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    return DALIGenericIterator(
        [pipe], ["x", "y"], last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False
    )


def dali_error_line(message: str) -> str:
    """The line of DALI's error that says what happened (after its 'encountered:' preamble)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    lines = [ln for ln in lines if ln != "Current pipeline object is no longer valid."] or lines
    if "encountered:" in lines:
        return (
            lines[lines.index("encountered:") + 1]
            if lines.index("encountered:") + 1 < len(lines)
            else lines[-1]
        )
    return lines[-1] if lines else "unknown DALI error"


def is_data_error(message: str) -> bool:
    """A failure of DALI's reader or decoder on the bytes it was given, as opposed to DALI or the
    device failing (driver, CUDA, nvJPEG resources, memory): only the former is worth a search."""
    device = re.search(r"out of memory|cuda|driver|nvml|cuInit|NVJPEG_STATUS_(?!BAD_JPEG)", message, re.I)
    in_data_op = re.search(r"operator `nvidia\.dali\.fn\.(readers\.webdataset|decoders\.\w+)`", message)
    return bool(in_data_op) and not device


def probe(device: torch.device) -> str | None:
    """None when DALI builds and runs a decoding pipeline on `device` (mixed decode on a GPU);
    otherwise DALI's reason, in one line."""
    from nvidia.dali import fn, pipeline_def, types
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(buf, format="JPEG")
    encoded = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    gpu = device.type == "cuda"

    @pipeline_def(batch_size=1, num_threads=1, device_id=(device.index or 0) if gpu else None)
    def pipe():
        jpg = fn.external_source(source=lambda: [encoded], batch=True, device="cpu")
        return fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)

    try:
        p = pipe()
        p.build()
        p.run()
    except Exception as e:
        return dali_error_line(str(e))
    return None
