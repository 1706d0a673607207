#!/usr/bin/env bash
# Fresh machine to test results: set up .venv (with the beam extra, whose
# engine the suite tests), then run the test suite
# (reads the benchmark images from ../shared/data). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test,beam
export BATCHSR_TEST_EXTRAS=beam  # installed: tests of it fail, not skip, when it cannot be imported
exec .venv/bin/python -m pytest "$@"
