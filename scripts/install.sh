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
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"torch was replaced: {torch.__version__}"
# build the compiled CPU kernels once (cached in $TORCH_EXTENSIONS_DIR); without a C++ compiler the
# slower PyTorch path is used and this says so
from crosscoder import native
status = "compiled CPU kernels built" if native.module() is not None else "WARNING: compiled CPU kernels not built (no C++ compiler?)"
print(f"crosscoder installed in .venv (torch {torch.__version__}); {status}")
PY
