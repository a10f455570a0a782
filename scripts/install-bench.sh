#!/usr/bin/env bash
# The reference implementations the kernel benchmark compares against, in their own venv
# (./.venv-bench), pinned, beside the same torch==2.13.0 as ./.venv:
#   EleutherAI's sparsify (TopK sparse coder), OpenMOSS's llamascopium (BatchTopK Crosscoder).
# A constraints file keeps pip from replacing torch while it resolves their dependencies.
# Not needed for the tests; tests/bench/bench_kernels.py --references uses it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv-bench/bin/python ] || "$PYTHON" -m venv .venv-bench
PIP=".venv-bench/bin/python -m pip"
$PIP install --quiet --disable-pip-version-check "torch==2.13.0"
# llamascopium 2.0.0b34 imports HookedTransformer, which TransformerLens 4 removed
printf "torch==2.13.0\ntransformer-lens==3.9.0\n" > .venv-bench/constraints.txt
$PIP install --quiet --disable-pip-version-check -c .venv-bench/constraints.txt "eai-sparsify==1.3.3" "llamascopium==2.0.0b34"
.venv-bench/bin/python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"torch was replaced: {torch.__version__}"
import sparsify, llamascopium  # noqa: F401
print(f"reference implementations installed in .venv-bench (torch {torch.__version__})")
PY
