"""Shared test settings: hypothesis examples sized for a 2-core CI machine.

HYPOTHESIS_PROFILE=thorough runs twenty times as many examples.
"""

import os

from hypothesis import settings

settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray with 2 CPUs for the module's tests (this machine has 2 cores)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
