#!/usr/bin/env bash
# Set up SAFE-FM in ./.venv on a fresh machine.
#   scripts/setup.sh        the product (safefm-anonymize, safefm-cam, safefm-identity, safefm-eval, safefm-bench)
#   scripts/setup.sh test   the same plus the test extras (pytest) and the scale extra (Ray, for safefm-batch's tests)
# torch is installed first (the local CPU build, torch==2.13.0) so that the `torch>=` range of
# the other packages is already met and pip does not pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${SAFEFM_TORCH_VERSION:-2.13.0}"
target="."
[ "${1:-}" = "test" ] && target=".[test,scale]"
python -m pip install -q -c constraints.txt -e "$target"
echo "SAFE-FM is installed in $(pwd)/.venv"
