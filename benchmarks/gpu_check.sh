#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU where CuPy (and PyTorch, PEFT, pytest,
# hypothesis) are already installed and there is no network: nothing is installed, the
# package is used from this checkout (PYTHONPATH=.). About 2-3 minutes on an H200.
#
#   bash benchmarks/gpu_check.sh
#
# 1. The whole test suite with MINILORA_REQUIRE_GPU=1: every test that takes the `device`
#    fixture also runs on "cuda", and a missing or broken GPU fails instead of skipping.
# 2. benchmarks/gpu_vs_cpu.py: training steps (full fine-tuning, LoRA) and inference,
#    GPU against CPU, for three model sizes; a table, and benchmarks/results/gpu_vs_cpu.json.
#
# The benchmark runs even when tests fail (a GPU session is too dear to waste); the exit
# status is non-zero if either part failed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
PY=${PYTHON:-python}

echo "== the machine"
"$PY" - <<'EOF'
import platform

import numpy

from minilora import backend

print(f"python {platform.python_version()}, numpy {numpy.__version__}")
cp = backend.cupy_module()
if cp is None:
    print("NO GPU: CuPy with a CUDA device is not available (the tests below will fail)")
else:
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"cupy {cp.__version__} on {name}, {props['totalGlobalMem'] / 2**30:.0f} GiB")
for extra in ("torch", "peft", "xdist", "nbmake"):
    try:
        __import__(extra)
        print(f"{extra}: present")
    except ImportError:
        print(f"{extra}: absent")
EOF

echo
echo "== 1. the test suite, with MINILORA_REQUIRE_GPU=1"
pytest_args=(-q)
if "$PY" -c "import xdist" 2>/dev/null; then
    pytest_args+=(-n 4)
fi
if ! "$PY" -c "import nbmake" 2>/dev/null; then
    # pyproject's addopts ask for --nbmake; without the plugin, run the tests/ folder only
    echo "(nbmake is not installed: the notebooks are not run)"
    pytest_args+=(-o "addopts=-ra" tests)
fi
start=$SECONDS
set +e
MINILORA_REQUIRE_GPU=1 "$PY" -m pytest "${pytest_args[@]}"
tests_status=$?
set -e
echo "(tests: exit status $tests_status, $((SECONDS - start)) s)"

echo
echo "== 2. GPU against CPU"
start=$SECONDS
set +e
"$PY" benchmarks/gpu_vs_cpu.py --devices cpu,cuda
bench_status=$?
set -e
echo "(benchmark: exit status $bench_status, $((SECONDS - start)) s)"

if [ "$tests_status" -ne 0 ] || [ "$bench_status" -ne 0 ]; then
    echo "GPU CHECK FAILED (tests: $tests_status, benchmark: $bench_status)"
    exit 1
fi
echo "GPU check passed"
