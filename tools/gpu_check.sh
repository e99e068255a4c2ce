#!/usr/bin/env bash
# GPU end-to-end check for lora-export: TensorRT engines (build, verify, refit X -> Y -> X), latency of
# PyTorch eager fp16 vs ONNX Runtime vs TensorRT (merged vs branched), refit vs build time.
#
# usage: tools/gpu_check.sh [--venv DIR] [--no-install] [gpu_check.py options...]
#   e.g. tools/gpu_check.sh --samples gpt2,gpt2-medium --iters 50 --json gpu_check.json
#
# Environment:
#   TORCH_INDEX  PyTorch wheel index for your CUDA (default https://download.pytorch.org/whl/cu128);
#                torch is installed from it only when the current torch has no CUDA.
#   PYTHON       interpreter used to create the venv (default python3).
#
# With an active virtualenv ($VIRTUAL_ENV) it installs into that one; otherwise it creates --venv
# (default .venv-gpu). Without TensorRT (or with TensorRT's wheels unreachable) it still runs the PyTorch
# CUDA and ONNX Runtime parts and lists what it skipped. Exit code: 0 all checks passed, 1 a check failed,
# 3 no CUDA device.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV_DIR=".venv-gpu"
INSTALL=1
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv) VENV_DIR="$2"; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  echo "using the active virtualenv $VIRTUAL_ENV"
else
  if [[ ! -x "$VENV_DIR/bin/python" ]]; then
    "${PYTHON:-python3}" -m venv "$VENV_DIR"
  fi
  # shellcheck disable=SC1091
  source "$VENV_DIR/bin/activate"
  echo "using virtualenv $VENV_DIR"
fi

if [[ "$INSTALL" == 1 ]]; then
  python -m pip install --quiet --upgrade pip
  # torch first, from the CUDA index: the PyPI default may be a CPU build on some platforms.
  if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    python -m pip install --quiet torch --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}"
  fi
  if ! python -m pip install --quiet -e '.[gpu,test]'; then
    echo "warning: the [gpu] extra did not install (TensorRT wheels come from pypi.nvidia.com);" \
         "continuing with .[test]: TensorRT steps will be skipped"
    python -m pip install --quiet -e '.[test]'
  fi
  # onnxruntime and onnxruntime-gpu share one package directory; make sure the CUDA one wins.
  if ! python -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
    echo "note: onnxruntime has no CUDA provider; reinstalling onnxruntime-gpu over onnxruntime"
    python -m pip uninstall --quiet -y onnxruntime onnxruntime-gpu || true
    python -m pip install --quiet onnxruntime-gpu || echo "warning: onnxruntime-gpu did not install: ORT CUDA steps will be skipped"
  fi
fi

command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "nvidia-smi not found"
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available:', torch.cuda.is_available())"
python -c "import tensorrt; print('TensorRT', tensorrt.__version__)" 2>/dev/null \
  || echo "TensorRT not importable: engine build/refit/latency steps will be skipped"
python -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"

exec python tools/gpu_check.py ${ARGS[@]+"${ARGS[@]}"}
