#!/usr/bin/env bash
# Install crosscoder and every pinned dependency into ./.venv (CPU machine, no CUDA downloads).
#
# torch is installed first and pinned to 2.13.0 (on this project's machines a CPU wheel on local
# disk); the pinned requirements come next and are checked not to replace it. DeepSpeed is an sdist:
# DS_BUILD_OPS=0 makes it build no CUDA ops, which a CPU machine cannot build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install --quiet --disable-pip-version-check "torch==2.13.0"
DS_BUILD_OPS=0 DS_ACCELERATOR=cpu $PIP install --quiet --disable-pip-version-check -r requirements.txt
$PIP install --quiet --disable-pip-version-check --no-deps -e .
.venv/bin/python -c 'import torch; assert torch.__version__.startswith("2.13.0"), f"torch was replaced: {torch.__version__}"'
# compiled code, built once into this venv (crosscoder/builds.py): our CPU kernels (without a C++
# compiler the slower PyTorch path runs, and this says so) and DeepSpeed's CPU comm op
.venv/bin/python -m crosscoder.builds
echo "crosscoder installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
