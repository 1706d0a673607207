#!/usr/bin/env bash
# Fresh machine to test results: set up .venv, then run the test suite
# (reads the benchmark images from ../shared/data). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
