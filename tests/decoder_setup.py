"""Decoder folders shared by the generation tests (exports take tens of seconds: each is made once per session).

Per architecture (gpt2, llama, qwen2): one PEFT model holding adapters x (r=8) and y (r=4, rsLoRA on llama)
with non-zero B (large enough that each adapter changes the greedy tokens), their PEFT directories, and
folders of the layouts a test asks for. gpt2's merged folder is written by the CLI (`export-decoder`, with its
own generation check); llama's and qwen2's merged folders are their inputs folders with adapter x baked in
(`optimize --bake`, no second trace).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import torch
from peft_oracle import add_peft_adapter, build_peft, fill_lora, save_adapter

ARCHS = ("gpt2", "llama", "qwen2")
TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj", "o_proj"]}
B_STD = {"gpt2": 0.5, "llama": 0.05, "qwen2": 0.05}  # B large enough that each adapter changes the greedy tokens
PROMPTS = [[11, 23, 5, 64, 8, 99, 7], [3, 17, 250], [41, 42, 43, 44, 45]]  # different lengths: left padding


def peft_config(arch: str, r: int, **kw) -> dict:
    return dict(r=r, lora_alpha=2 * r, target_modules=TARGETS[arch], fan_in_fan_out=arch == "gpt2", **kw)


class DecoderSetup:
    def __init__(self, root: Path, sample_cache):
        self.root = root
        self.sample_cache = sample_cache
        self._models: dict[str, dict] = {}
        self._folders: dict[tuple[str, str], Path] = {}

    def model(self, arch: str) -> dict:
        if arch not in self._models:
            loaded = self.sample_cache(arch)
            seed = 100 + ARCHS.index(arch) * 10
            pm = build_peft(loaded, seed=seed, adapter_name="x", **peft_config(arch, 8))
            add_peft_adapter(pm, "y", seed + 1, **peft_config(arch, 4, use_rslora=arch == "llama"))
            fill_lora(pm, seed, "x", b_std=B_STD[arch])
            fill_lora(pm, seed + 1, "y", b_std=B_STD[arch])
            dirs = {n: save_adapter(pm, self.root / f"{arch}_adapters", n) for n in ("x", "y")}
            self._models[arch] = dict(loaded=loaded, pm=pm, dirs=dirs)
        return self._models[arch]

    def folder(self, arch: str, layout: str) -> Path:
        key = (arch, layout)
        if key not in self._folders:
            self._folders[key] = self._make(arch, layout)
        return self._folders[key]

    def _make(self, arch: str, layout: str) -> Path:
        from lora_export.adapters import read_adapter
        from lora_export.export.decoder import export_decoder

        m = self.model(arch)
        out = self.root / f"{arch}_{layout}"
        adapters = [read_adapter(m["dirs"][n], name=n) for n in ("x", "y")]
        if layout == "merged" and arch == "gpt2":
            from cli_helpers import run

            run("export-decoder", "sample:gpt2", "-o", out, "--adapter", m["dirs"]["x"])
        elif layout == "merged":
            from lora_export.passes import optimize_file

            inputs = self.folder(arch, "inputs")
            shutil.copytree(inputs, out, ignore=shutil.ignore_patterns("adapters", "model.onnx*"))
            optimize_file(inputs / "model.onnx", out / "model.onnx", bake=inputs / "adapters" / "x.onnx_adapter")
        else:
            export_decoder(m["loaded"], out, adapters=adapters, layout=layout)
        return out


def peft_generate(pm, prompt: list[int], new_tokens: int, adapter: str | None) -> list[int]:
    """Greedy PEFT `generate` on one prompt alone with `adapter` (None: adapters disabled = the base model)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = torch.tensor([prompt])
    ctx = pm.disable_adapter() if adapter is None else contextlib.nullcontext()
    if adapter is not None:
        pm.set_adapter(adapter)
    with ctx, torch.no_grad():
        out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    tokens = out[0, len(prompt) :].tolist()
    assert len(tokens) == new_tokens, "the reference stopped early"
    return tokens


def peft_logits(pm, adapter: str | None, prompt: list[int], then: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """PEFT logits of a prefill on `prompt` `[len, vocab]`, then of one decode step on `then` with its cache."""
    ids = torch.tensor([prompt])
    ctx = pm.disable_adapter() if adapter is None else contextlib.nullcontext()
    if adapter is not None:
        pm.set_adapter(adapter)
    with ctx, torch.no_grad():
        first = pm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        cache = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
        n = len(prompt) + len(then)
        second = pm(
            input_ids=torch.tensor([then]),
            attention_mask=torch.ones(1, n, dtype=torch.long),
            position_ids=torch.arange(len(prompt), n)[None],
            cache=cache,
            use_cache=True,
        )
    return first.logits[0].numpy(), second.logits[0].numpy()
