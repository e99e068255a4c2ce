"""Shared fixtures: tiny samples built once per session, random adapters with non-zero B."""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ARCHS = ["gpt2", "llama", "bert"]


@pytest.fixture(scope="session")
def sample_cache():
    from lora_export.models import load_model

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_model(f"sample:{name}")
        return cache[name]

    return get


@pytest.fixture(scope="session")
def checkpoints(sample_cache, tmp_path_factory):
    """`checkpoints["gpt2"]` -> the tiny sample saved as a transformers directory (safetensors; GPT-2's tied
    lm_head not stored), written on first use and shared by the session: tests must not change it."""
    root = tmp_path_factory.mktemp("ckpt")

    class Dirs(dict):
        def __missing__(self, arch: str):
            sample_cache(arch).module.save_pretrained(root / arch, safe_serialization=True)
            self[arch] = root / arch
            return self[arch]

    return Dirs()


@pytest.fixture
def sample(sample_cache):
    """`sample("gpt2")` -> a LoadedModel whose module is a private copy (tests may mutate it)."""

    def get(name: str):
        loaded = copy.copy(sample_cache(name))
        loaded.module = copy.deepcopy(loaded.module)
        return loaded

    return get


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory, sample_cache):
    """Branched/merged graphs exported once per session: key -> path (exports take seconds)."""
    from lora_export.export.branched import export_branched

    root = tmp_path_factory.mktemp("graphs")
    cache = {}

    def get(arch: str, layout: str = "inputs", **kwargs):
        key = (arch, layout, tuple(sorted(kwargs.items())))
        if key not in cache:
            path = root / f"{arch}_{layout}_{len(cache)}.onnx"
            export_branched(sample_cache(arch), path, layout=layout, **kwargs)
            cache[key] = path
        return cache[key]

    return get


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory):
    """A random PEFT adapter for sample:gpt2 written by `make-adapter` (r=4, seed 3)."""
    from cli_helpers import run

    out = tmp_path_factory.mktemp("cli") / "adapter"
    run("make-adapter", "sample:gpt2", "-o", out, "--r", "4", "--seed", "3")
    return out


def make_random_adapter(loaded, **kw):
    from lora_export.adapters.synthetic import random_model_adapter

    return random_model_adapter(loaded, **kw)


@pytest.fixture(scope="session")
def decoders(tmp_path_factory, sample_cache):
    """Decoder folders and their PEFT oracles, made once per session (see decoder_setup.py)."""
    from decoder_setup import DecoderSetup

    return DecoderSetup(tmp_path_factory.mktemp("decoders"), sample_cache)


@pytest.fixture(scope="session")
def serve_decoder(tmp_path_factory):
    """A bank decoder folder of sample:gpt2 with four packed adapters, a fifth as a PEFT dir, a tokenizer, and the
    offline generator over it (built once: the serving tests share it)."""
    from serve_oracle import make_decoder

    return make_decoder(tmp_path_factory.mktemp("serve_decoder"), adapters=5)
