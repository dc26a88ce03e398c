"""Batch-sized buffers that loader workers stack their images into, mapped once before they fork.

A DataLoader worker normally puts every batch into a new shared-memory file, which the main process
receives over a socket and maps. For 64 grey 424 px images that costs ~10 ms of a worker's ~70 ms
per batch: allocating, faulting in and freeing 11.5 MB each time. Here the main process maps one
anonymous shared region before the workers fork, each worker owns a few batch-sized slots in it,
stacks a batch into a free slot and sends only the slot's number. The main process hands the slot's
memory to the consumer without a copy; the slot is free again only once the last tensor viewing it
has been freed, so it is never rewritten while anything can still read it. When all of a worker's
slots are held (a consumer that keeps batches), that batch takes torch's own path.

The region is no file in /dev/shm (which Docker limits to 64 MB by default) and vanishes with the
processes that map it, however they end.
"""

from __future__ import annotations

import itertools
import logging
import math
import mmap
import weakref
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

log = logging.getLogger(__name__)

_TOKENS = itertools.count()
# buffers by token, for the batches that arrive in the main process (see `_InSlot`)
_LIVE: weakref.WeakValueDictionary[int, BatchBuffers] = weakref.WeakValueDictionary()


class BatchBuffers:
    """`slots_per_worker` slots of `batch_shape` uint8 for each of `workers` forked loader workers.

    A slot's flag is set by its worker after stacking a batch into it and cleared by the main process
    when the last tensor viewing it is freed; only a worker sets it and only the main process clears
    it, so no lock is shared between processes (a worker killed mid-batch cannot block the others).
    """

    def __init__(self, workers: int, slots_per_worker: int, batch_shape: tuple[int, ...]) -> None:
        self.workers = workers
        self.slots_per_worker = slots_per_worker
        self.batch_shape = tuple(batch_shape)
        count = workers * slots_per_worker
        pixels = math.prod(self.batch_shape)
        self._slot_bytes = _whole_pages(pixels)
        self._first_slot = _whole_pages(count)
        # MAP_SHARED and anonymous: forked workers write into the very pages the main process reads
        self._memory = mmap.mmap(-1, self._first_slot + count * self._slot_bytes)
        self._held = np.frombuffer(self._memory, np.uint8, count)
        self._slots = [
            np.frombuffer(self._memory, np.uint8, pixels, self._offset(slot)).reshape(self.batch_shape)
            for slot in range(count)
        ]
        self._token = next(_TOKENS)
        _LIVE[self._token] = self

    def stack(self, images: list[torch.Tensor]) -> Any:
        """In a worker: the images stacked into a free slot of its own, as a reference to that slot;
        elsewhere, or with every slot held, torch's own stacked tensor."""
        worker = get_worker_info()
        first = images[0]
        if (
            worker is None
            or worker.num_workers != self.workers
            or len(images) > self.batch_shape[0]
            or tuple(first.shape) != self.batch_shape[1:]
            or first.dtype != torch.uint8
        ):
            return default_collate(images)
        own = range(worker.id * self.slots_per_worker, (worker.id + 1) * self.slots_per_worker)
        for slot in own:
            if not self._held[slot]:
                torch.stack(images, out=torch.from_numpy(self._slots[slot][: len(images)]))
                self._held[slot] = 1
                return _InSlot(self._token, slot, len(images))
        return default_collate(images)

    def receive(self, slot: int, count: int) -> torch.Tensor:
        """In the main process: the slot's first `count` images, freeing the slot with the last view."""
        pixels = self._slots[slot][:count]
        weakref.finalize(pixels, self._free, slot).atexit = False
        return torch.from_numpy(pixels)  # (the tensor's storage holds `pixels` until it is freed)

    def holds(self, images: torch.Tensor) -> bool:
        """Whether `images` lie in these buffers (rather than in a tensor torch's own path made)."""
        start = self._held.ctypes.data
        return start <= images.data_ptr() < start + len(self._memory)

    def slots_held(self) -> int:
        return int(self._held.sum())

    def _free(self, slot: int) -> None:
        self._held[slot] = 0

    def drop_free_pages(self) -> None:
        """Give the memory of the slots no tensor views back to the system (they are faulted in again
        when next written). Only while no worker has a batch to make: after a pass, for loaders that
        are not iterated again at once."""
        for slot in np.flatnonzero(self._held == 0):
            self._memory.madvise(mmap.MADV_REMOVE, self._offset(int(slot)), self._slot_bytes)

    def _offset(self, slot: int) -> int:
        return self._first_slot + slot * self._slot_bytes


class _InSlot:
    """What a worker sends instead of the pixels: unpickled in the main process, it becomes the slot's
    tensor. Every batch the main process reads is unpickled, also those DataLoader discards when an
    epoch is cut short, so no slot stays held by a batch nobody will see."""

    def __init__(self, token: int, slot: int, count: int) -> None:
        self.where = (token, slot, count)

    def __reduce__(self) -> tuple[Any, tuple[int, int, int]]:
        return _receive, self.where


def _receive(token: int, slot: int, count: int) -> torch.Tensor:
    buffers = _LIVE.get(token)
    if buffers is None:
        raise RuntimeError(
            f"a loader batch arrived for batch buffers {token}, which no longer exist; "
            "a DataLoader was freed while its workers still had batches to send"
        )
    return buffers.receive(slot, count)


def _whole_pages(size: int) -> int:
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


def for_loader(workers: int, prefetch_factor: int, batch_shape: tuple[int, ...]) -> BatchBuffers | None:
    """Buffers for a loader whose workers are forked: room for every batch a worker may have in flight
    (`prefetch_factor`) and two the consumer is still using; None if the system refuses the mapping
    or cannot give its pages back (MADV_REMOVE is Linux's)."""
    if not hasattr(mmap, "MADV_REMOVE"):
        return None
    try:
        return BatchBuffers(workers, prefetch_factor + 2, batch_shape)
    except OSError as err:
        log.warning("loader batches take torch's shared-memory files: no batch buffers (%s)", err)
        return None
