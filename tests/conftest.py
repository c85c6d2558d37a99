"""Shared test settings: hypothesis examples sized for a 2-core CI machine.

HYPOTHESIS_PROFILE=thorough runs twenty times as many examples.
"""

import os

from hypothesis import settings

settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
