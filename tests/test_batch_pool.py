"""The loader's shared buffers, lent and handed back, without a DataLoader: plain queues."""

from __future__ import annotations

import queue

import torch

from trainer.batch_pool import TrainerPool, WorkerPool


def pools(capacity: int = 3) -> tuple[WorkerPool, TrainerPool]:
    returns = queue.Queue()
    return WorkerPool(0, returns, capacity, room=64), TrainerPool([returns])


def test_a_buffer_crosses_once_then_as_its_number():
    worker, trainer = pools()
    trainer.attach()
    buffer, lease = worker.lend(10, iteration=1)
    assert lease.buffer is buffer and buffer.numel() >= 64, "whole, with room to spare"
    buffer[:3] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert torch.equal(trainer.buffer(lease)[:3], buffer[:3])
    trainer.hand_back(lease)
    again, second = worker.lend(10, iteration=1)
    assert again is buffer and second.buffer is None, "mapped: crosses as a number"
    assert trainer.buffer(second) is buffer and second.ticket != lease.ticket


def test_a_buffer_is_never_lent_twice_until_handed_back():
    worker, trainer = pools(capacity=2)
    leases = [worker.lend(8, iteration=1)[1] for _ in range(4)]
    assert [lease.worker for lease in leases] == [0, 0, None, None], "then one-off buffers"
    assert leases[0].number != leases[1].number
    trainer.hand_back(leases[1])
    assert worker.lend(8, iteration=1)[1].number == leases[1].number


def test_leases_left_by_a_loop_that_broke_are_taken_back_once_attached():
    worker, trainer = pools(capacity=2)
    left = [worker.lend(8, iteration=1)[1] for _ in range(2)]  # dropped by the DataLoader
    assert worker.lend(8, iteration=2)[1].worker is None, "not attached: never taken back"
    trainer.attach()
    taken = {worker.lend(8, iteration=2)[1].number for _ in range(2)}
    assert taken == {lease.number for lease in left}


def test_a_stale_hand_back_never_frees_a_buffer_lent_again():
    worker, trainer = pools(capacity=1)
    trainer.attach()
    first = worker.lend(8, iteration=1)[1]
    second = worker.lend(8, iteration=2)[1]  # taken back for the new iteration, lent again
    assert second.number == first.number
    trainer.hand_back(first)  # the old lease's hand-back arrives late
    third = worker.lend(8, iteration=2)[1]
    assert third.worker is None, "still lent: the stale hand-back was ignored"
    trainer.hand_back(second)
    assert worker.lend(8, iteration=2)[1].number == first.number


def test_a_buffer_that_must_grow_crosses_again():
    worker, trainer = pools(capacity=1)
    small = worker.lend(8, iteration=1)[1]
    trainer.buffer(small)
    trainer.hand_back(small)
    big_buffer, big = worker.lend(1000, iteration=1)
    assert big.buffer is big_buffer and big_buffer.numel() >= 1000
    assert trainer.buffer(big) is big_buffer
