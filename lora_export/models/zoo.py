"""The embedded sample zoo: small architectures built from a config with a fixed seed (nothing downloaded).

`gpt2`, `llama`, `qwen2`, `mistral`, `bert` are tiny (a few MB) for tests and the demo; `gpt2-small` and `gpt2-medium`
have the real shapes (random weights) for benchmarks; `convnet` is a small CNN for the Conv2d path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SEED = 1234


@dataclass(frozen=True)
class Sample:
    arch: str
    model_class: str  # transformers class name, or "" for a plain torch sample
    config: dict[str, Any]
    about: str


SAMPLES: dict[str, Sample] = {
    "gpt2": Sample(
        "gpt2",
        "GPT2LMHeadModel",
        dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=256, bos_token_id=0, eos_token_id=0),
        "tiny GPT-2 (2x64)",
    ),
    "llama": Sample(
        "llama",
        "LlamaForCausalLM",
        dict(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=160,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1000,
            max_position_embeddings=256,
        ),
        "tiny Llama (2x64, GQA)",
    ),
    "qwen2": Sample(
        "qwen2",
        "Qwen2ForCausalLM",
        dict(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=160,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1000,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "tiny Qwen2 (2x64, GQA, q/k/v biases)",
    ),
    "mistral": Sample(
        "mistral",
        "MistralForCausalLM",
        dict(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=160,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1000,
            max_position_embeddings=256,
            sliding_window=4096,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "tiny Mistral (2x64, GQA)",
    ),
    "bert": Sample(
        "bert",
        "BertModel",
        dict(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            vocab_size=1000,
            max_position_embeddings=256,
        ),
        "tiny BERT encoder (2x64)",
    ),
    "gpt2-small": Sample(
        "gpt2",
        "GPT2LMHeadModel",
        dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
        "GPT-2 small shape (12x768), random weights",
    ),
    "gpt2-medium": Sample(
        "gpt2",
        "GPT2LMHeadModel",
        dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024),
        "GPT-2 medium shape (24x1024), random weights",
    ),
    "convnet": Sample("convnet", "", dict(channels=8, classes=10), "small CNN (Conv2d path, merged only)"),
}


class ConvNet(nn.Module):
    def __init__(self, channels: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels * 2, 3, padding=1)
        self.head = nn.Linear(channels * 2, classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(pixel_values))
        h = torch.relu(self.conv2(h))
        return self.head(h.mean(dim=(2, 3)))  # (B, classes)


def build_sample(name: str) -> tuple[nn.Module, Sample]:
    import transformers

    sample = SAMPLES[name]
    torch.manual_seed(SEED)
    if not sample.model_class:
        return ConvNet(**sample.config).eval(), sample
    config = transformers.AutoConfig.for_model(sample.arch, **sample.config)
    config.use_cache = False
    config._attn_implementation = "eager"  # plain MatMul/Softmax graphs: portable and fusable
    model = getattr(transformers, sample.model_class)(config)
    return model.eval(), sample
