"""What the stages write and read back: the floor just above `contract`.

- `fileio`: atomic files and folders, hashes, JSON sidecars, one-line I/O errors;
- `onnxio`: graph headers, slots, I/O entries, the sidecar manifest (`read_manifest` / `write_manifest`)
  and the external-data threshold;
- `decoder_folder`: the decoder folder format (`model.onnx`, `genai_config.json`, manifest facts, `adapters/`);
- `plan_manifest`: a TensorRT engine plan's manifest;
- `checkpoint`: a model's weights read from its checkpoint files (safetensors) or from its modules;
- `memory`: handing freed memory back to the OS between big stages.

The manifest's schema is `contract.manifest.GraphManifest`; what an export records in it is built by
`export.manifest`. Nothing here imports a stage.
"""
