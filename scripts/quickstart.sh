#!/usr/bin/env bash
# Fresh machine to upscaled images: set up .venv, then upscale the bundled
# samples with the bundled x4 model into ./out/samples.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/batchsr run batchsr/samples out/samples
echo "upscaled images are in $(pwd)/out/samples"
