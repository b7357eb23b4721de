"""What DALI is fed: the rank's batches, read by worker processes of this loader into shared memory,
handed to DALI whole, with no Python per sample in the rank process.

DALI's parallel external source receives every sample with Python in the rank process (nvidia-dali
2.4.0: _multiproc/shared_batch.py `deserialize_batch` unpickles a SampleMeta and makes an array per
sample, and feeding a list of arrays converts each), under the rank's GIL. Here a batch travels as one
dense (batch, row) uint8 array that DALI's plain external source takes without a copy (`no_copy`):
each row a 16-byte header (the image's length as int32, 4 bytes of padding, its label as int64) and
the encoded image, rows padded to the batch's largest. The graph reads the header and cuts each image
to its length (ffscale/data/dali.py). One array, not three: every array DALI's `feed_input` takes is
a fixed cost in the rank's thread (its conversion and hand-over to the executor), paid per batch
(`ffscale bench data` measures the rank's Python per image). What the rank does per batch is the batch's sample ids written into its
slot, a 32-byte record written to the workers' pipe, a 16-byte record read back, and an array view.

- **Workers** (`FeedWorkers`, one set per loader, `data.workers` of them, at least one): processes
  that open the split's index once, then take (batch, slot, row length, count) records and write each
  sample's header and image at its row of the slot, the sample ids read from the slot's id area
  (written there by the rank). Records are fixed-size and smaller than PIPE_BUF, so a write is atomic
  and the workers share one task pipe and one result pipe without locks (a pickling queue costs the
  rank ten times the CPU per batch). A bad sample comes back as the DataError naming its shard and
  key, through a queue kept for failures. They die with the rank (its parent-death signal), ignore
  SIGTERM (a preemption is the rank's to handle: it checkpoints, then stops them) and import numpy
  and the index, not torch or DALI (spawn, once CUDA is initialised, starts them afresh; it also
  imports the rank's main script again, as multiprocessing does: a `--entry` script's top level runs
  in each).
- **Slots**: files in /dev/shm (the temp dir where there is none), mapped by the rank and every
  worker, unlinked as soon as all workers have mapped them, so nothing is left behind by a kill.
  Each is sized for the split's largest image in every row, plus a page-aligned id area, and stays
  sparse: a worker frees a slot's row pages before writing it, so a slot holds the bytes of one batch.
- **Reuse**: DALI keeps a `no_copy` buffer until the outputs of `prefetch_queue_depth` later
  iterations are taken (its ExternalSource docs, `no_copy`), so a slot is written again only after
  `queue + 1` newer batches have been handed over: there are `ahead + queue + 2` slots.

`BatchFeed` is one epoch's (or one evaluation's) batches over those workers: DALI calls it once per
iteration in the rank's thread; it raises StopIteration at the end and then starts over (the
evaluation pipeline is reset, not rebuilt).
"""

from __future__ import annotations

import atexit
import functools
import io
import mmap
import multiprocessing
import os
import select
import signal
import struct
import tempfile

import numpy as np

from ffscale.data.samples import image_bytes, parse_label
from ffscale.data.tarindex import TarIndex
from ffscale.errors import DaliFailure, DataError
from ffscale.util.lifeline import die_with_parent

PAD_LABEL = -1  # eval padding: every batch has micro_batch rows; the engine counts labels >= 0 only
PAD_ID = -1  # a padding position in a batch's sample ids
ROW_ALIGN = 64  # bytes; rows start aligned
HEAD = struct.Struct("=i4xq")  # the start of each row: the image's length, 4 bytes of padding, its label
HEADER = HEAD.size  # 16 bytes; the label's 8 are aligned
WAIT_S = 1.0  # how often a rank waiting for a batch checks that its workers live
TASK = struct.Struct("=qqqq")  # batch number, slot, row length, samples; number STOP ends a worker
RESULT = struct.Struct("=qq")  # batch number (MAPPED at start-up), FAILED when its error is queued
STOP, MAPPED = -1, -2
OK, FAILED = 0, 1


@functools.cache
def pad_image() -> bytes:
    """A tiny valid JPEG every decoder reads, for eval's padding rows."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def _shm_dir() -> str:
    return (
        "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    )


class FeedWorkers:
    """A loader's worker processes and the shared-memory slots they write batches into."""

    def __init__(self, index: TarIndex, num_classes: int, batch: int, workers: int, slots: int,
                 start_method: str):  # fmt: skip
        sizes = index.img[:, 1]
        self.row_cap = _align(max(int(sizes.max()) if len(sizes) else 0, len(pad_image())) + HEADER)
        self.batch = batch
        self.ids_at = -(-batch * self.row_cap // mmap.PAGESIZE) * mmap.PAGESIZE  # the rows' pages end here
        self.slot_bytes = self.ids_at + 8 * batch
        self.sizes = np.maximum(sizes, 0)
        self.maps: list[mmap.mmap] = []
        self.procs: list = []
        self.failures: dict[int, BaseException] = {}
        paths: list[str] = []
        try:
            for _ in range(slots):
                fd, path = tempfile.mkstemp(prefix="ffscale-feed-", dir=_shm_dir())
                paths.append(path)
                try:
                    os.ftruncate(fd, self.slot_bytes)  # sparse: pages exist once written
                    self.maps.append(mmap.mmap(fd, self.slot_bytes))
                finally:
                    os.close(fd)
            ctx = multiprocessing.get_context(start_method)
            self._tasks_r, self._tasks = ctx.Pipe(duplex=False)
            self._results, self._results_w = ctx.Pipe(duplex=False)
            self.errors = ctx.SimpleQueue()
            # poll(2) on the result pipe, set up once: Connection.poll builds a selector in Python on
            # every call (CPython 3.11 multiprocessing/connection.py, `wait` and its _WaitSelector),
            # which the rank would pay per batch; poll(2), not select(2): the fd may be above 1023
            self._ready = select.poll()
            self._ready.register(self._results.fileno(), select.POLLIN)
            layout = (batch, self.row_cap, self.ids_at)
            for k in range(max(1, workers)):
                self.procs.append(ctx.Process(
                    target=_work,
                    args=(index, num_classes, paths, layout, self._tasks_r, self._results_w, self.errors, os.getpid()),
                    daemon=True, name=f"ffscale-feed-{k}",
                ))  # fmt: skip
                self.procs[-1].start()
            # they ignore SIGTERM, so multiprocessing's own exit handler (terminate, then join) would
            # wait on them for ever: this one, registered later, runs first
            atexit.register(self.close)
            for _ in self.procs:  # each has mapped every slot
                self.receive()
        except BaseException:
            self.close()
            raise
        finally:
            for path in paths:
                os.unlink(path)

    def row_lengths(self, ids: np.ndarray) -> np.ndarray:
        """Each batch's row length: its longest image and the header (`ids` as (batches, batch))."""
        sizes = np.where(ids == PAD_ID, len(pad_image()), self.sizes[np.maximum(ids, 0)])
        return -(-(sizes.max(axis=1) + HEADER) // ROW_ALIGN) * ROW_ALIGN

    def submit(self, number: int, slot: int, row: int, ids: np.ndarray) -> None:
        """Batch `number` (its samples' ids) to be written into `slot` in rows of `row` bytes."""
        np.frombuffer(self.maps[slot], np.int64, self.batch, self.ids_at)[:] = ids
        os.write(self._tasks.fileno(), TASK.pack(number, slot, row, self.batch))

    def rows(self, slot: int, row: int) -> np.ndarray:
        """Slot `slot` as (batch, row) bytes: a view DALI takes without a copy."""
        return np.frombuffer(self.maps[slot], dtype=np.uint8, count=self.batch * row).reshape(self.batch, row)

    def receive(self) -> tuple[int, BaseException | None]:
        """The next record from the workers: (number of a finished batch, None), (number, the error its
        samples raised), or at start-up (MAPPED, None)."""
        while not self._ready.poll(WAIT_S * 1000):
            dead = [p for p in self.procs if not p.is_alive()]
            if dead:
                raise DaliFailure(
                    f"the DALI feed's worker process {dead[0].pid} ended (exit code {dead[0].exitcode}; "
                    "killed: -9 is often the out-of-memory killer). Train without DALI with data.loader=webdataset"
                )
        number, status = RESULT.unpack(os.read(self._results.fileno(), RESULT.size))
        if status == OK:
            return number, None
        while number not in self.failures:  # the workers' failures come in the order they were queued
            failed, error = self.errors.get()
            self.failures[failed] = error
        return number, self.failures.pop(number)

    def close(self) -> None:
        atexit.unregister(self.close)
        for p in self.procs:
            if p.is_alive():
                os.write(self._tasks.fileno(), TASK.pack(STOP, 0, 0, 0))
        for p in self.procs:
            if p.pid is None:  # never started (start-up failed before it)
                continue
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs = []
        if hasattr(self, "_ready"):  # before its pipe closes: a later receive() must not poll a reused fd
            self._ready.unregister(self._results.fileno())
            del self._ready
        for end in ("_tasks_r", "_tasks", "_results", "_results_w", "errors"):
            if hasattr(self, end):
                getattr(self, end).close()
                delattr(self, end)
        for m in self.maps:
            try:
                m.close()
            except BufferError:  # a view DALI was handed still lives: the mapping goes with it
                pass
        self.maps = []


def _align(n: int) -> int:
    return -(-n // ROW_ALIGN) * ROW_ALIGN


def _work(index: TarIndex, num_classes: int, paths: list[str], layout: tuple[int, int, int], tasks, results,
          errors, rank_pid: int) -> None:  # fmt: skip
    """A worker process: map the slots, say so, then fill batches until told to stop."""
    die_with_parent()
    if os.getppid() != rank_pid:  # the rank died before the signal was asked for
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    batch, row_cap, ids_at = layout
    maps = []
    for path in paths:
        fd = os.open(path, os.O_RDWR)
        try:
            maps.append(mmap.mmap(fd, 0))
        finally:
            os.close(fd)
    tasks_fd, results_fd = tasks.fileno(), results.fileno()
    os.write(results_fd, RESULT.pack(MAPPED, OK))
    while True:
        number, slot, row, n = TASK.unpack(os.read(tasks_fd, TASK.size))
        if number == STOP:
            return
        ids = np.frombuffer(maps[slot], np.int64, n, ids_at).copy()
        try:
            _fill(index, num_classes, maps[slot], batch * row_cap, row, ids)
            os.write(results_fd, RESULT.pack(number, OK))
            continue
        except DataError as e:  # a bad sample, or storage not answering: the rank raises it as it is
            errors.put((number, type(e)(_short(str(e)))))  # (a StorageError's exit code says: retry)
        except Exception as e:  # anything else, said by the rank as DALI's feed failing
            errors.put(
                (number, RuntimeError(_short(f"the DALI feed's worker failed: {type(e).__name__}: {e}")))
            )
        os.write(results_fd, RESULT.pack(number, FAILED))


def _fill(
    index: TarIndex, num_classes: int, buf: mmap.mmap, rows_bytes: int, row: int, ids: np.ndarray
) -> None:
    """The batch's headers and images written at their rows of `buf`."""
    try:
        buf.madvise(mmap.MADV_REMOVE, 0, rows_bytes)  # the previous batch's pages go: a slot holds one batch
    except OSError:  # a file system without hole punching (a temp dir on overlayfs): pages stay
        pass
    for r, i in enumerate(ids.tolist()):
        if i == PAD_ID:
            img, label = pad_image(), PAD_LABEL
        else:
            sample = index.read(i)
            img, label = image_bytes(sample, index.members), parse_label(sample, num_classes, index.members)
        if HEADER + len(img) > row:  # the index's size of the sample, by which rows are cut, is wrong
            raise DataError(
                f"{index.where(i)}: {len(img)} bytes, not the {row - HEADER} or fewer its index says"
            )
        at = r * row
        buf[at : at + HEADER] = HEAD.pack(len(img), label)
        buf[at + HEADER : at + HEADER + len(img)] = img


def _short(message: str, limit: int = 4096) -> str:
    """A failure's line, short enough that putting it on the queue never waits for the rank (a pipe
    holds 64 KiB, and the rank reads the queue only after the failure's record)."""
    return message if len(message) <= limit else message[:limit] + " ..."


def header(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The lengths (int32) and labels (int64) in the headers of a batch's rows, as (batch,) arrays."""
    return rows[:, 0:4].copy().view(np.int32)[:, 0], rows[:, 8:16].copy().view(np.int64)[:, 0]


class BatchFeed:
    """One epoch's batches for DALI's external source (`batch=True, no_copy=True`, one output):
    batch k holds the samples `ids[k * batch : (k + 1) * batch]`, positions from `real` on padding."""

    def __init__(self, workers: FeedWorkers, ids: np.ndarray, real: int, ahead: int):
        b = workers.batch
        ids = np.asarray(ids, dtype=np.int64).copy()
        ids[real:] = PAD_ID
        self.workers, self.ahead = workers, ahead
        self.ids = ids[: len(ids) // b * b].reshape(-1, b)
        self.rows = workers.row_lengths(self.ids).tolist()
        self.slots = len(workers.maps)
        self._restart()

    def _restart(self) -> None:
        self.taken = self.sent = self.received = 0
        self.done: dict[int, object] = {}

    def _receive(self) -> None:
        number, error = self.workers.receive()
        self.done[number] = error
        self.received += 1

    def _send_ahead(self) -> None:
        while self.sent < len(self.ids) and self.sent <= self.taken + self.ahead:
            self.workers.submit(self.sent, self.sent % self.slots, self.rows[self.sent], self.ids[self.sent])
            self.sent += 1

    def __call__(self):
        if self.taken >= len(self.ids):
            self._restart()  # the next call starts the epoch again (an evaluation pipeline's reset)
            raise StopIteration
        self._send_ahead()
        while self.taken not in self.done:
            self._receive()
        error = self.done.pop(self.taken)
        if error is not None:
            raise error
        slot, row = self.taken % self.slots, self.rows[self.taken]
        self.taken += 1
        self._send_ahead()
        return self.workers.rows(slot, row)

    def drain(self) -> None:
        """Wait for the batches sent and not taken (an epoch cut short, an evaluation abandoned): the
        workers must not write a slot the next feed hands to DALI. Nothing to wait for once the workers
        are closed (an epoch's generator finalised at exit, after the loader's `close`)."""
        while self.received < self.sent and self.workers.procs:
            self._receive()
        self._restart()
