"""Running the stages' work units on Ray: bounded in flight, retried on worker loss, with progress.

The only module of `pipeline` that imports Ray. Work units are plain picklable functions that
turn their own failures into results (rejections), so a raised exception here means the
infrastructure failed: Ray retries the task on a lost worker or node (`max_retries`) and on
an I/O error, and anything else stops the job.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import ray
from tqdm import tqdm


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def default_in_flight() -> int:
    """Two tasks per CPU of the cluster: enough to hide scheduling gaps, bounded memory."""
    return max(2, 2 * cluster_cpus())


def _timed(function: Callable, *args) -> tuple[object, float]:
    """`function(*args)` and the milliseconds it took on its worker."""
    start = time.perf_counter()
    result = function(*args)
    return result, 1000 * (time.perf_counter() - start)


def map_unordered(
    function: Callable,
    tasks: Iterable[tuple[object, tuple]],
    *,
    description: str,
    total_items: int | None,
    items_of: Callable[[object], int],
    max_in_flight: int | None = None,
    max_retries: int = 3,
) -> Iterator[tuple[object, object, float]]:
    """For every (tag, args) of `tasks`, yield (tag, `function(*args)`, milliseconds it took on
    its worker), in completion order.

    `tasks` is read as slots free up, so it may size each task from the results yielded
    before (work_plan.py). At most `max_in_flight` tasks are submitted at once;
    `items_of(result)` advances the progress bar, which counts files (of `total_items`, when
    known).
    """
    remote = ray.remote(_timed).options(max_retries=max_retries, retry_exceptions=[OSError])
    limit = max_in_flight or default_in_flight()
    pending: dict[ray.ObjectRef, object] = {}
    with tqdm(total=total_items, desc=description, unit="img", smoothing=0.1) as bar:

        def next_result():
            done, _ = ray.wait(list(pending), num_returns=1)
            result, milliseconds = ray.get(done[0])
            bar.update(items_of(result))
            return pending.pop(done[0]), result, milliseconds

        for tag, args in tasks:
            pending[remote.remote(function, *args)] = tag
            if len(pending) >= limit:
                yield next_result()
        while pending:
            yield next_result()


def _fit_task(fit: Callable, *args) -> tuple:
    """A fit task's returns: one per piece it fitted, then its report (small: the driver reads
    it)."""
    pieces, report = fit(*args)
    return (*pieces, report)


def fit_then_write(
    fit: Callable,
    fit_tasks: Iterable[tuple[object, tuple, list[int], list[bool]]],
    write: Callable,
    write_arguments: list[tuple],
    *,
    total_items: int,
    on_fitted: Callable[[object, object], int],
    max_in_flight: int | None = None,
    max_retries: int = 3,
) -> Iterator:
    """Run fit tasks and the write tasks that gather their pieces; yield write results.

    `fit_tasks` yields (tag, args, groups, last): `fit(*args)` returns (one result per entry of
    `groups`, the write group (shard) each belongs to, and a report). When a task's piece is
    its group's `last`, `write(*write_arguments[g], *pieces)` is submitted with all of group
    g's pieces as object references: they go from the fit workers to the writer through Ray's
    object store, never through the driver. As each fit task ends, `on_fitted(tag, report)`
    runs in the driver and returns its images for the progress bar; `fit_tasks` is read as
    slots free up, so it may size each task from the reports before.

    At most `max_in_flight` fit tasks are pending at once, and as many writes: a write
    waiting for its pieces holds no CPU, so it must not hold a fit task's place either.
    """
    options = {"max_retries": max_retries, "retry_exceptions": [OSError]}
    remote_fit = ray.remote(_fit_task)
    remote_write = ray.remote(write).options(**options)
    limit = max_in_flight or default_in_flight()
    gathered: dict[int, list[ray.ObjectRef]] = {}
    fits: dict[ray.ObjectRef, object] = {}  # a task's report -> its tag
    writes: list[ray.ObjectRef] = []
    with (
        tqdm(total=total_items, desc="fit", unit="img", smoothing=0.1) as fit_bar,
        tqdm(total=len(write_arguments), desc="write", unit="shard", smoothing=0.1) as write_bar,
    ):

        def settle_one():
            done, _ = ray.wait([*fits, *writes], num_returns=1)
            if done[0] in fits:
                fit_bar.update(on_fitted(fits.pop(done[0]), ray.get(done[0])))
                return None
            writes.remove(done[0])
            write_bar.update(1)
            return ray.get(done[0])

        for tag, args, groups, last in fit_tasks:
            returns = remote_fit.options(num_returns=len(groups) + 1, **options).remote(fit, *args)
            fits[returns[-1]] = tag
            for group, result, closes in zip(groups, returns[:-1], last, strict=True):
                gathered.setdefault(group, []).append(result)
                if closes:
                    pieces = gathered.pop(group)
                    writes.append(remote_write.remote(*write_arguments[group], *pieces))
            while len(fits) >= limit or len(writes) >= limit:
                if (result := settle_one()) is not None:
                    yield result
        while fits or writes:
            if (result := settle_one()) is not None:
                yield result


def map_on_actors(
    actor_class: type,
    actor_arguments: tuple,
    method: str,
    arguments: list[tuple],
    *,
    description: str,
    total_items: int,
    items_of: Callable[[object], int],
    max_in_flight: int | None = None,
    max_retries: int = 3,
    unit: str = "img",
) -> list:
    """`actor.method(*args)` for every tuple of `arguments` on a pool of actors that hold state
    (a model): one per GPU with `num_gpus=1` where the cluster has GPUs, else one per CPU.

    A lost actor is restarted and its task retried; at most `max_in_flight` tasks (default two
    per actor) are pending. Results come back in completion order; the progress bar counts
    `items_of` each result in `unit`s.
    """
    gpus = int(ray.cluster_resources().get("GPU", 0))
    per_actor = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    device = "cuda" if gpus else "cpu"
    count = max(1, min(gpus or cluster_cpus(), len(arguments)))
    remote = ray.remote(actor_class).options(
        **per_actor, max_restarts=max_retries, max_task_retries=max_retries
    )
    actors = [remote.remote(*actor_arguments, device) for _ in range(count)]
    limit = max_in_flight or 2 * count
    pending: dict[ray.ObjectRef, int] = {}
    results = []
    with tqdm(total=total_items, desc=description, unit=unit, smoothing=0.1) as bar:
        for number, args in enumerate(arguments):
            actor = actors[number % count]
            pending[getattr(actor, method).remote(*args)] = number
            while len(pending) >= limit or (number == len(arguments) - 1 and pending):
                done, _ = ray.wait(list(pending), num_returns=1)
                del pending[done[0]]
                results.append(ray.get(done[0]))
                bar.update(items_of(results[-1]))
    for actor in actors:
        ray.kill(actor)
    return results
