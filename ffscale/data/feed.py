"""What DALI is fed: the rank's batches, read by worker processes of this loader into shared memory,
handed to DALI whole, with no Python per sample in the rank process.

DALI's parallel external source receives every sample with Python in the rank process (nvidia-dali
2.4.0: _multiproc/shared_batch.py `deserialize_batch` unpickles a SampleMeta and makes an array per
sample, and feeding a list of arrays converts each), under the rank's GIL. Here a batch travels as three dense arrays that DALI's plain external source takes without a
copy (`no_copy`): the encoded images as rows of a (batch, row) uint8 array padded to the batch's
largest image, their lengths and their labels. The graph cuts each row to its length
(ffscale/data/dali.py). What the rank does per batch is one queue message each way and three array
views.

- **Workers** (`FeedWorkers`, one set per loader, `data.workers` of them, at least one): processes
  that open the split's index once, then take (batch, slot, row length, sample ids) tasks and write
  each sample's image bytes at its row of the slot, returning the lengths and the labels (checked
  here). A bad sample comes back as the DataError naming its shard and key. They die with the rank
  (its parent-death signal), ignore SIGTERM (a preemption is the rank's to handle: it checkpoints,
  then stops them) and import numpy and the index, not torch or DALI (spawn, once CUDA is
  initialised, starts them afresh; it also imports the rank's main script again, as multiprocessing
  does: a `--entry` script's top level runs in each).
- **Slots**: files in /dev/shm (the temp dir where there is none), mapped by the rank and every
  worker, unlinked as soon as all workers have mapped them, so nothing is left behind by a kill.
  Each is sized for the split's largest image in every row and stays sparse: a worker frees a slot's
  pages before writing it, so a slot holds the bytes of one batch.
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
import signal
import tempfile

import numpy as np

from ffscale.data.samples import image_bytes, parse_label
from ffscale.data.tarindex import TarIndex
from ffscale.errors import DaliFailure, DataError
from ffscale.util.lifeline import die_with_parent

PAD_LABEL = -1  # eval padding: every batch has micro_batch rows; the engine counts labels >= 0 only
PAD_ID = -1  # a padding position in a batch's sample ids
ROW_ALIGN = 64  # bytes; rows start aligned
WAIT_S = 1.0  # how often a rank waiting for a batch checks that its workers live


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
        self.row_cap = _align(max(int(sizes.max()) if len(sizes) else 0, len(pad_image())))
        self.batch, self.slot_bytes = batch, batch * self.row_cap
        self.sizes = np.maximum(sizes, 0)
        self.maps: list[mmap.mmap] = []
        self.procs: list = []
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
            self.tasks, self.results = ctx.SimpleQueue(), ctx.SimpleQueue()
            for k in range(max(1, workers)):
                self.procs.append(ctx.Process(
                    target=_work, args=(index, num_classes, paths, self.tasks, self.results, os.getpid()),
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
        """Each batch's row length: its longest image (`ids` as (batches, batch))."""
        sizes = np.where(ids == PAD_ID, len(pad_image()), self.sizes[np.maximum(ids, 0)])
        return -(-sizes.max(axis=1) // ROW_ALIGN) * ROW_ALIGN

    def submit(self, number: int, slot: int, row: int, ids: bytes) -> None:
        """Batch `number` (its samples' ids as int64 bytes) to be written into `slot` in rows of `row` bytes."""
        self.tasks.put((number, slot, row, ids))

    def rows(self, slot: int, row: int) -> np.ndarray:
        """Slot `slot` as (batch, row) bytes: a view DALI takes without a copy."""
        return np.frombuffer(self.maps[slot], dtype=np.uint8, count=self.batch * row).reshape(self.batch, row)

    def receive(self):
        """The next message from the workers: (number, (row length, lengths and labels as bytes)) of a
        finished batch, (number, the error its samples raised), or at start-up "mapped"."""
        while not self.results._reader.poll(WAIT_S):
            dead = [p for p in self.procs if not p.is_alive()]
            if dead:
                raise DaliFailure(
                    f"the DALI feed's worker process {dead[0].pid} ended (exit code {dead[0].exitcode}; "
                    "killed: -9 is often the out-of-memory killer). Train without DALI with data.loader=webdataset"
                )
        return self.results.get()

    def close(self) -> None:
        atexit.unregister(self.close)
        for p in self.procs:
            if p.is_alive():
                self.tasks.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs = []
        for m in self.maps:
            try:
                m.close()
            except BufferError:  # a view DALI was handed still lives: the mapping goes with it
                pass
        self.maps = []


def _align(n: int) -> int:
    return -(-n // ROW_ALIGN) * ROW_ALIGN


def _work(index: TarIndex, num_classes: int, paths: list[str], tasks, results, rank_pid: int) -> None:
    """A worker process: map the slots, say so, then fill batches until told to stop."""
    die_with_parent()
    if os.getppid() != rank_pid:  # the rank died before the signal was asked for
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    maps = []
    for path in paths:
        fd = os.open(path, os.O_RDWR)
        try:
            maps.append(mmap.mmap(fd, 0))
        finally:
            os.close(fd)
    results.put("mapped")
    while (task := tasks.get()) is not None:
        number, slot, row, ids = task
        try:
            results.put(
                (number, (row, _fill(index, num_classes, maps[slot], row, np.frombuffer(ids, np.int64))))
            )
        except DataError as e:  # a bad sample: the rank raises it, naming shard and key
            results.put((number, e))
        except Exception as e:  # anything else, said by the rank as DALI's feed failing
            results.put((number, RuntimeError(f"the DALI feed's worker failed: {type(e).__name__}: {e}")))


def _fill(index: TarIndex, num_classes: int, buf: mmap.mmap, row: int, ids: np.ndarray) -> bytes:
    """The batch's images written at their rows of `buf`; their lengths (int32: fn.slice takes its
    shape so) and labels (int64), as the bytes of the two arrays (a message, not pickled arrays)."""
    try:
        buf.madvise(mmap.MADV_REMOVE)  # the previous batch's pages go: a slot holds one batch
    except OSError:  # a file system without hole punching (a temp dir on overlayfs): pages stay
        pass
    lengths = np.empty((len(ids), 1), dtype=np.int32)
    labels = np.empty((len(ids), 1), dtype=np.int64)
    for r, i in enumerate(ids.tolist()):
        if i == PAD_ID:
            img, label = pad_image(), PAD_LABEL
        else:
            sample = index.read(i)
            img, label = image_bytes(sample, index.members), parse_label(sample, num_classes, index.members)
        buf[r * row : r * row + len(img)] = img
        lengths[r, 0], labels[r, 0] = len(img), label
    return labels.tobytes() + lengths.tobytes()  # the int64s first: both views stay aligned


class BatchFeed:
    """One epoch's batches for DALI's external source (`batch=True, no_copy=True`, three outputs):
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
        number, got = self.workers.receive()
        self.done[number] = got
        self.received += 1

    def _send_ahead(self) -> None:
        while self.sent < len(self.ids) and self.sent <= self.taken + self.ahead:
            self.workers.submit(
                self.sent, self.sent % self.slots, self.rows[self.sent], self.ids[self.sent].tobytes()
            )
            self.sent += 1

    def __call__(self):
        if self.taken >= len(self.ids):
            self._restart()  # the next call starts the epoch again (an evaluation pipeline's reset)
            raise StopIteration
        self._send_ahead()
        while self.taken not in self.done:
            self._receive()
        got = self.done.pop(self.taken)
        if isinstance(got, BaseException):
            raise got
        row, message = got
        b = self.workers.batch
        labels = np.frombuffer(message, np.int64, b).reshape(b, 1)
        lengths = np.frombuffer(message, np.int32, b, offset=8 * b).reshape(b, 1)
        slot = self.taken % self.slots
        self.taken += 1
        self._send_ahead()
        return self.workers.rows(slot, row), lengths, labels

    def drain(self) -> None:
        """Wait for the batches sent and not taken (an epoch cut short, an evaluation abandoned): the
        workers must not write a slot the next feed hands to DALI."""
        while self.received < self.sent:
            self._receive()
        self._restart()
