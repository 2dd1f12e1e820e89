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
# The registry's torchvision 0.28.0 is a CUDA build; beside CPU torch its C++ ops do not load and a
# plain `import torchvision` (so `import timm`) fails. This .pth runs vitslim_torchvision_guard at
# every start of the venv's Python, whatever a script imports first; it does nothing where the ops
# loaded, and nothing once vitslim is uninstalled (find_spec, rather than an import that would fail).
.venv/bin/python - <<'PY'
import pathlib, sysconfig
line = 'import importlib.util; importlib.util.find_spec("vitslim_torchvision_guard") and __import__("vitslim_torchvision_guard").install()\n'
pathlib.Path(sysconfig.get_paths()["purelib"], "vitslim-torchvision-guard.pth").write_text(line)
PY
