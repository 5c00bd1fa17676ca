#!/usr/bin/env bash
# Create .venv and install fusion-dist with its test tools. Safe and quick to re-run: it
# reinstalls only when pyproject.toml changed since the last successful install.
#
# On a machine without CUDA it installs the CPU wheel torch==2.13.0 first, so that pip does not
# pull gigabytes of CUDA packages; with a torch already in .venv it keeps that one (GPU users
# install their CUDA build first, then run this).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_CPU_PIN=${TORCH_CPU_PIN:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

stamp="$VENV/.fusion-dist-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing the default (CUDA) torch build"
    "$PY" -m pip install -q torch
  else
    echo "[setup] no GPU: installing the CPU wheel $TORCH_CPU_PIN"
    "$PY" -m pip install -q "$TORCH_CPU_PIN"
  fi
fi
echo "[setup] installing fusion-dist and its dependencies (a few minutes the first time)"
"$PY" -m pip install -q -e ".[dev]"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # DeepSpeed compiles these C++ ops the first time a CPU run needs them (the shared-memory all-reduce
  # on every multi-rank start, CPU Adam under optimizer offload): minutes on a small machine, paid here
  # once instead of inside the first training run. They are cached in ~/.cache/torch_extensions. Built
  # with the venv's own ninja, the one every run finds on its PATH: another ninja version rewrites the
  # build log in its own format, and the next run's ninja then rebuilds everything.
  echo "[setup] building DeepSpeed's CPU ops (shared-memory all-reduce, CPU Adam; once, a few minutes)"
  PATH="$(cd "$VENV/bin" && pwd):$PATH" "$PY" - <<'PY' || echo "[setup] warning: DeepSpeed's CPU ops did not build; runs will try again when they need them"
from deepspeed.accelerator import get_accelerator

acc = get_accelerator()
if acc.device_name() == "cpu":
    for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
        acc.create_op_builder(name).load(verbose=False)
PY
fi
echo "$want" >"$stamp"
echo "[setup] done: $("$PY" -c 'import torch, deepspeed, transformers; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")')"
