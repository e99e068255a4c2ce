"""torch -> ONNX: merged, branched (`inputs` layout) and bank (per-row adapters), names kept stable."""
