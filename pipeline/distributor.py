"""Running the stages' work units on Ray: bounded in flight, retried on worker loss, with progress.

The only module of `pipeline` that imports Ray. Work units are plain picklable functions that
turn their own failures into results (rejections), so a raised exception here means the
infrastructure failed: Ray retries the task on a lost worker or node (`max_retries`) and on
an I/O error, and anything else stops the job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import ray
from tqdm import tqdm


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def default_in_flight() -> int:
    """Two tasks per CPU of the cluster: enough to hide scheduling gaps, bounded memory."""
    return max(2, 2 * cluster_cpus())


def map_unordered(
    function: Callable,
    arguments: Iterable[tuple],
    *,
    description: str,
    total_items: int,
    items_of: Callable[[object], int],
    max_in_flight: int | None = None,
    max_retries: int = 3,
) -> Iterator:
    """Yield `function(*args)` for every tuple of `arguments`, in completion order.

    At most `max_in_flight` tasks are submitted at once; `items_of(result)` advances the
    progress bar, which counts images (`total_items`) and shows images/s.
    """
    remote = ray.remote(function).options(max_retries=max_retries, retry_exceptions=[OSError])
    limit = max_in_flight or default_in_flight()
    pending: list[ray.ObjectRef] = []
    with tqdm(total=total_items, desc=description, unit="img", smoothing=0.1) as bar:

        def next_result():
            nonlocal pending
            done, pending = ray.wait(pending, num_returns=1)
            result = ray.get(done[0])
            bar.update(items_of(result))
            return result

        for args in arguments:
            pending.append(remote.remote(*args))
            if len(pending) >= limit:
                yield next_result()
        while pending:
            yield next_result()


def _spread(function: Callable, *args) -> object:
    """Run `function`, whose result is a list of one value per return of its task."""
    results = function(*args)
    return results[0] if len(results) == 1 else tuple(results)


def fit_then_write(
    fit: Callable,
    fit_arguments: Iterable[tuple[tuple, list[int], int]],
    write: Callable,
    write_arguments: list[tuple],
    pieces_of: list[int],
    *,
    total_items: int,
    max_in_flight: int | None = None,
    max_retries: int = 3,
) -> Iterator:
    """Run fit tasks and the write tasks that gather their pieces; yield write results.

    `fit_arguments` yields (args, groups, items): `fit(*args)` returns one result per entry of
    `groups`, the write group (shard) it belongs to, for `items` images. Once every one of
    group g's `pieces_of[g]` results is submitted, `write(*write_arguments[g], *results)` is
    submitted with them as object references: the pieces go from the fit workers to the writer
    through Ray's object store, never through the driver. At most `max_in_flight` tasks of both
    kinds are pending at once; progress bars count images fitted and shards written.
    """
    options = {"max_retries": max_retries, "retry_exceptions": [OSError]}
    remote_fit = ray.remote(_spread)
    remote_write = ray.remote(write).options(**options)
    limit = max_in_flight or default_in_flight()
    gathered: dict[int, list[ray.ObjectRef]] = {}
    fits: dict[ray.ObjectRef, int] = {}  # a task's first result -> its images
    writes: list[ray.ObjectRef] = []
    with (
        tqdm(total=total_items, desc="fit", unit="img", smoothing=0.1) as fit_bar,
        tqdm(total=len(write_arguments), desc="write", unit="shard", smoothing=0.1) as write_bar,
    ):

        def settle_one():
            nonlocal writes
            done, _ = ray.wait([*fits, *writes], num_returns=1)
            if done[0] in fits:
                fit_bar.update(fits.pop(done[0]))
                return None
            writes.remove(done[0])
            write_bar.update(1)
            return ray.get(done[0])

        for args, groups, items in fit_arguments:
            results = remote_fit.options(num_returns=len(groups), **options).remote(fit, *args)
            results = [results] if len(groups) == 1 else results
            fits[results[0]] = items
            for group, result in zip(groups, results, strict=True):
                gathered.setdefault(group, []).append(result)
                if len(gathered[group]) == pieces_of[group]:
                    pieces = gathered.pop(group)
                    writes.append(remote_write.remote(*write_arguments[group], *pieces))
            while len(fits) + len(writes) >= limit:
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
) -> list:
    """`actor.method(*args)` for every tuple of `arguments` on a pool of actors that hold state
    (a model): one per GPU with `num_gpus=1` where the cluster has GPUs, else one per CPU.

    A lost actor is restarted and its task retried; at most `max_in_flight` tasks (default two
    per actor) are pending. Results come back in completion order.
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
    with tqdm(total=total_items, desc=description, unit="img", smoothing=0.1) as bar:
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
