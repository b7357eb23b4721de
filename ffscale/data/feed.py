"""The sample source DALI's parallel external source calls in its worker processes: position k of
the rank's epoch list -> its encoded image and label. The reads, header checks and label parsing
run in the workers, at the split's index offsets (TarIndex), each with its own open shards; what
stays in the rank process per sample is DALI's receiving of it from shared memory (Python in
nvidia-dali 2.4.0: _multiproc/shared_batch.py `deserialize_batch`, external_source.py
`_prep_data_for_feed_input`).

Kept apart from ffscale/data/dali.py so that a worker started by `spawn` (DALI's start method once
CUDA is initialised) imports numpy, PIL and the index, not torch or DALI's graph code.
"""

from __future__ import annotations

import functools
import io
import os

import numpy as np

from ffscale.data.samples import image_bytes, parse_label
from ffscale.data.tarindex import TarIndex
from ffscale.errors import DataError, StorageError
from ffscale.util.lifeline import die_with_parent

# DALI's workers hand a callback's exception to the pipeline as RuntimeError(str(e)) inside a
# generic Exception carrying the worker's traceback (nvidia-dali 2.4.0,
# nvidia/dali/_multiproc/messages.py `failed`, pool.py `handle_error`): the class is lost, so a bad
# sample's message starts with this mark and the loader turns it back into one DataError line.
DATA_ERROR_MARK = "ffscale data error: "
STORAGE_ERROR_MARK = "ffscale storage error: "  # remote storage not answering: exit 1, not 2 (errors.py)
PAD_LABEL = -1  # eval padding: every batch has micro_batch rows; the engine counts labels >= 0 only


@functools.cache
def pad_image() -> bytes:
    """A tiny valid JPEG every decoder reads, for eval's padding rows."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


LABEL_BYTES = 8  # the label rides after the image's bytes as an int64 (native byte order)


def packed(image: bytes | np.ndarray, label: int) -> np.ndarray:
    """One uint8 array: the encoded image, then its label's 8 bytes. DALI receives each output of
    each sample with Python in the rank process (nvidia-dali 2.4.0, _multiproc/shared_batch.py
    `deserialize_batch`, external_source.py `_prep_data_for_feed_input`), so one output costs half
    of two; the graph splits it again (dali._pipeline)."""
    return np.concatenate(
        [np.frombuffer(image, dtype=np.uint8), np.array([label], dtype=np.int64).view(np.uint8)]
    )


def read_sample(index: TarIndex, i: int, num_classes: int) -> np.ndarray:
    """Sample i as DALI takes it: its encoded image and its label (checked here), `packed`."""
    s = index.read(i)
    return packed(image_bytes(s, index.members), parse_label(s, num_classes, index.members))


class SampleSource:
    """`fn.external_source(source=SampleSource(...), batch=False, parallel=True)`: DALI calls it with
    a SampleInfo per sample, and it returns the sample `packed`; `idx_in_epoch` k gives the plan's sample `ids[k]`, positions from `real`
    on are padding, and StopIteration ends the epoch at len(ids) (a whole number of batches: DALI's
    parallel source drops a last partial batch). Picklable: a mapped index travels as its path."""

    def __init__(self, index: TarIndex, ids: np.ndarray, real: int, num_classes: int):
        self.index, self.ids, self.real, self.num_classes = index, ids, real, num_classes
        self.owner = os.getpid()  # the rank; DALI's worker processes call it

    def __call__(self, info) -> np.ndarray:
        _die_with_the_rank(self.owner)
        k = info.idx_in_epoch
        if k >= len(self.ids):
            raise StopIteration
        if k >= self.real:
            return packed(pad_image(), PAD_LABEL)
        try:
            return read_sample(self.index, int(self.ids[k]), self.num_classes)
        except DataError as e:
            mark = STORAGE_ERROR_MARK if isinstance(e, StorageError) else DATA_ERROR_MARK
            raise RuntimeError(mark + str(e)) from None


_ARMED: list[int] = []  # the worker process that asked for its parent-death signal (a fork copies it)


def _die_with_the_rank(rank_pid: int) -> None:
    """In a DALI worker process, once: be killed when the rank that started it dies. DALI's workers
    wait on their task queue and outlive a rank killed with SIGKILL (the OOM killer, or the watch
    on `ffscale train`: ffscale/util/lifeline.py), reading on for nobody."""
    me = os.getpid()
    if me == rank_pid or me in _ARMED:
        return
    _ARMED[:] = [me]
    die_with_parent()


def data_error_in(error: BaseException) -> DataError | None:
    """The DataError a worker's sample raised, found in the exception DALI re-raised; else None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for line in str(error).splitlines():
            for mark, kind in ((DATA_ERROR_MARK, DataError), (STORAGE_ERROR_MARK, StorageError)):
                at = line.find(mark)
                if at >= 0:
                    return kind(line[at + len(mark) :].strip())
        error = error.__cause__ or error.__context__
    return None
