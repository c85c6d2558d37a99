"""Running a stage's work units on Ray: bounded in flight, retried on worker loss, with progress.

The only module of `pipeline` that imports Ray. Work units are plain picklable functions that
turn their own failures into results (rejections), so a raised exception here means the
infrastructure failed: Ray retries the task on a lost worker or node (`max_retries`) and on
an I/O error, and anything else stops the job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import ray
from tqdm import tqdm


def default_in_flight() -> int:
    """Two tasks per CPU of the cluster: enough to hide scheduling gaps, bounded memory."""
    return max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


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
