#!/usr/bin/env bash
# One-shot set-up on a fresh machine: a project-local virtual environment with vitslim and
# everything its tests need. Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch and torchvision first, pinned together, so that installing timm or transformers never
# pulls a different torch build (CPU torch 2.13.0 here; on a CUDA machine install your own pair
# first and set VITSLIM_SKIP_TORCH=1).
if [ -z "${VITSLIM_SKIP_TORCH:-}" ]; then
  .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}" "torchvision==${TORCHVISION_VERSION:-0.28.0}"
fi
.venv/bin/pip install -q -e ".[test]" \
  "torch==$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')"
