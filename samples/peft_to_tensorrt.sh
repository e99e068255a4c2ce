#!/usr/bin/env bash
# From a PEFT adapter to deployable artifacts. Usage: samples/peft_to_tensorrt.sh MODEL ADAPTER_DIR [OUT_DIR]
# MODEL: a local transformers directory (or sample:gpt2); ADAPTER_DIR: adapter_config.json + adapter_model.safetensors.
set -euo pipefail
MODEL=${1:?MODEL}; ADAPTER=${2:?ADAPTER_DIR}; OUT=${3:-lora-artifacts}
mkdir -p "$OUT"

lora-export inspect "$ADAPTER" --model "$MODEL"
lora-export merge-and-export "$MODEL" --adapter "$ADAPTER" -o "$OUT/merged.onnx" --force        # verifies
lora-export merge-and-export "$MODEL" -o "$OUT/base.onnx" --force --no-verify                    # refit baseline
lora-export export-branched "$MODEL" --adapter "$ADAPTER" -o "$OUT/branched.onnx" --force        # verifies
lora-export pack-adapter "$ADAPTER" -o "$OUT/adapter.onnx_adapter" --graph "$OUT/branched.onnx" --force

# TensorRT (exits 3 with one line where TensorRT or a GPU is missing)
if lora-export build-engine "$OUT/merged.onnx" -o "$OUT/merged.plan" --refit --base "$OUT/base.onnx" --force; then
  lora-export verify "$MODEL" --adapter "$ADAPTER" --engine "$OUT/merged.plan"
else
  echo "skipped the TensorRT engine (see the line above)"
fi
