"""Shared pytest configuration for minilora's tests."""

import os

from hypothesis import HealthCheck, settings

# --- Hypothesis profiles -------------------------------------------------------------
# "ci" (the default): derandomized, so every run checks the same examples.
# "dev": more examples, random; choose it with HYPOTHESIS_PROFILE=dev.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# --- Fixtures ------------------------------------------------------------------------
