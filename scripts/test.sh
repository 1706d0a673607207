#!/usr/bin/env bash
# Fresh machine to test results: set up .venv (with the beam extra, whose
# engine the suite tests), then run the test suite
# (reads the benchmark images from ../shared/data). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test,beam
# Installed extras: their tests fail, not skip, when they cannot be imported.
export BATCHSR_TEST_EXTRAS=beam
# The PyTorch backend check (tests/test_backends.py) where a CPU build of torch lies on disk:
# PyPI's torch wheel brings CUDA, several GB, so it is not a dependency.
shopt -s nullglob
python_tag=$(.venv/bin/python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
torch_wheels=("${TORCH_WHEEL_DIR:-/opt/wheels}"/torch-*+cpu-"$python_tag"-*.whl)
if ((${#torch_wheels[@]})); then
    if .venv/bin/python -m pip install --quiet "${torch_wheels[0]}"; then
        BATCHSR_TEST_EXTRAS+=,torch
    else
        echo "test.sh: ${torch_wheels[0]} did not install; the PyTorch backend cases are skipped" >&2
    fi
fi
exec .venv/bin/python -m pytest "$@"
