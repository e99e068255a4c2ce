"""TensorRT engines: build from our graphs, refit-swap adapters, and the `OUT.plan.json` manifest.

Everything that needs TensorRT or a GPU imports it lazily (`engines._trt`), so profile parsing, flag
selection, the refit plan (numpy over the ONNX graph) and the manifest work, and are tested, without it.
"""
