"""Shared pytest configuration for minilora's tests."""

import os

import pytest
from hypothesis import HealthCheck, settings
from standin import register as register_standin

from minilora import backend

register_standin()  # the "standin" device (tests/standin.py): a GPU's rules on the CPU

# --- Hypothesis profiles -------------------------------------------------------------
# "ci" (the default): derandomized, so every run checks the same examples.
# "dev": more examples, random; choose it with HYPOTHESIS_PROFILE=dev.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    # the ``ops`` fixture below only switches a global setting, the same for every example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# --- Notebooks ---------------------------------------------------------------------------
# The notebooks (notebooks/*.ipynb) run as tests through nbmake when it is installed (the dev
# extra), as if --nbmake were given; without it, ``pytest tests/x.py`` still works.


def pytest_configure(config):
    if config.pluginmanager.hasplugin("nbmake"):
        config.option.nbmake = True


# --- Reference ops and the fast path --------------------------------------------------
# A module that sets ``pytestmark = pytest.mark.usefixtures("ops")`` runs each of its tests
# twice: on the fast path (the default) and on the reference ops of functional.py alone, as
# MINILORA_OPS=reference would. The gradient checks and the model-level properties do.


@pytest.fixture(params=["fast", "reference"])
def ops(request) -> str:
    with backend.use_ops(request.param):
        yield request.param


@pytest.fixture
def reference_ops():
    """Run one test on the reference ops only (for tests that patch a reference op)."""
    with backend.use_ops("reference"):
        yield


# --- Devices -------------------------------------------------------------------------
# One fixture runs a test on every device: "cpu" always; "standin" always (a CPU stand-in
# for a GPU whose arrays refuse implicit conversion to NumPy, so host fallbacks fail here
# as they would on CuPy; see tests/standin.py); "cuda" when CuPy and a GPU are present.
# Without them the "cuda" case is skipped with a reason, or FAILS when MINILORA_REQUIRE_GPU=1
# (set on a GPU machine, so that a broken CuPy install cannot pass as "skipped").
# Select or deselect the GPU cases with the marker: -m gpu, -m "not gpu".

DEVICES = ["cpu", "standin", pytest.param("cuda", marks=pytest.mark.gpu)]


def require_cuda() -> None:
    """Skip the calling test without a usable GPU, or fail it under MINILORA_REQUIRE_GPU=1."""
    if backend.cuda_available():
        return
    reason = "CuPy with a CUDA device is not available"
    if os.environ.get("MINILORA_REQUIRE_GPU") == "1":
        pytest.fail(f"MINILORA_REQUIRE_GPU=1 but {reason} (is cupy installed for this CUDA?)")
    pytest.skip(reason)


@pytest.fixture
def cuda_requirement():
    """The check the ``device`` fixture makes for "cuda" (for tests of the check itself)."""
    return require_cuda


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """A device name: each test using this fixture runs once per device."""
    if request.param == "cuda":
        require_cuda()
    return request.param
