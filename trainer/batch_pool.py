"""Shared-memory batch buffers that loader workers lend to the trainer and get back.

Why: a fresh shared-memory batch every step costs its page faults twice (in the worker that
writes it and in the trainer that reads it) and a file-descriptor handshake to cross processes.
A few buffers per worker, reused, let a batch cross as a few numbers (bench/loader_bench.py
measures both ways).

The life cycle of one buffer, owned by the worker that made it (`WorkerPool`):

1. Free in its worker's pool. A pool holds at most `capacity` buffers; a worker with none free
   writes into a fresh one-off buffer instead, which is never reused.
2. Lent: the worker writes a batch into it and sends a `Lease` with the batch: its number and a
   ticket for this use, and the buffer itself the first time the trainer sees it (or after it
   grew).
3. Handed back: the trainer (`TrainerPool`) keeps every buffer it has seen mapped, so later
   leases cross as numbers; once it has converted the batch it hands the lease back on the
   worker's queue, and the buffer is free again.
4. Taken back: a lease the trainer never hands back, because its loop broke out of an epoch and
   the DataLoader dropped the batches then in flight when it began the next iteration, is taken
   back by the worker the first time it serves a later iteration. Only once a `TrainerPool` has
   attached: a consumer that keeps its batches (a plain DataLoader loop) never has a buffer it
   holds written again, since only hand-backs free buffers then.
5. A hand-back whose ticket is not the buffer's current lease (it crossed a new iteration after
   the buffer was taken back and lent again) is ignored.

Two DataLoader behaviours are relied on: persistent workers keep their pools between epochs,
and a new iteration drops the batches the previous one left in flight (both tested through
trainer/loader.py). Nothing here depends on the DataLoader otherwise: the pools are
plain objects and queues, unit-tested alone.
"""

from __future__ import annotations

import queue
from typing import NamedTuple

import torch

ATTACHED = "trainer attached"  # on a worker's queue: leases out since an earlier iteration are dead


class Lease(NamedTuple):
    """One use of a buffer, as it crosses to the trainer with a batch."""

    worker: int | None  # None: a one-off buffer, never handed back
    number: int  # the buffer's number in its worker's pool
    ticket: int  # this use of it; a hand-back with another ticket is stale
    buffer: torch.Tensor | None  # the whole buffer when the trainer may not have it mapped


class WorkerPool:
    """A worker's buffers: lends them for batches, takes them back (see the module docstring)."""

    def __init__(self, worker: int, returns: queue.Queue, capacity: int, room: int = 0):
        self.worker, self.returns, self.capacity = worker, returns, capacity
        self.room = room  # bytes a new buffer gets at least: the largest batch, to spare regrowth
        self._buffers: list[torch.Tensor] = []
        self._free: set[int] = set()
        self._lent: dict[int, tuple[int, int]] = {}  # number -> (iteration, ticket) of its lease
        self._mapped: set[int] = set()  # numbers the trainer has mapped
        self._tickets, self._attached = 0, False

    def lend(self, size: int, iteration: int) -> tuple[torch.Tensor, Lease]:
        """A buffer of at least `size` bytes for a batch of `iteration`, and its lease."""
        self._receive(iteration)
        if self._free:
            number = self._free.pop()
        elif len(self._buffers) < self.capacity:
            number = len(self._buffers)
            self._buffers.append(torch.empty(0, dtype=torch.uint8))
        else:  # every buffer is out: a one-off
            buffer = torch.empty(size, dtype=torch.uint8).share_memory_()
            return buffer, Lease(None, -1, 0, buffer)
        if self._buffers[number].numel() < size:  # grown: the trainer must map it anew
            room = max(size, self.room) * 9 // 8
            self._buffers[number] = torch.empty(room, dtype=torch.uint8).share_memory_()
            self._mapped.discard(number)
        self._tickets += 1
        self._lent[number] = (iteration, self._tickets)
        buffer = self._buffers[number]
        shared = None if number in self._mapped else buffer
        return buffer, Lease(self.worker, number, self._tickets, shared)

    def _receive(self, iteration: int) -> None:
        """Hand-backs and ATTACHED from the trainer; then leases dead since an earlier
        iteration, once attached."""
        while True:
            try:
                message = self.returns.get_nowait()
            except queue.Empty:
                break
            if message == ATTACHED:
                self._attached = True
            elif self._lent.get(message[0], (0, None))[1] == message[1]:
                del self._lent[message[0]]
                self._free.add(message[0])
                self._mapped.add(message[0])
        if self._attached:
            for number, (lent_in, _) in list(self._lent.items()):
                if lent_in < iteration:
                    del self._lent[number]
                    self._free.add(number)


class TrainerPool:
    """The trainer's side: maps the buffers leases bring and hands each lease back once used."""

    def __init__(self, returns: list[queue.Queue]):
        self.returns = returns  # one queue per worker
        self._mapped: dict[tuple[int, int], torch.Tensor] = {}

    def attach(self) -> None:
        """Say that leases will be handed back: workers may take back the ones left behind."""
        for returns in self.returns:
            returns.put(ATTACHED)

    def buffer(self, lease: Lease) -> torch.Tensor:
        """The whole buffer a lease is for."""
        if lease.worker is None:
            return lease.buffer
        if lease.buffer is not None:
            self._mapped[lease.worker, lease.number] = lease.buffer
        return self._mapped[lease.worker, lease.number]

    def hand_back(self, lease: Lease) -> None:
        """The batch is used (converted or copied off): its buffer may be written again."""
        if lease.worker is not None:
            self.returns[lease.worker].put((lease.number, lease.ticket))
