"""A non-transformers model for `py:` loading: any torch module plus example inputs
(`py:lora_export.models.two_tower:make`; the tests load it as `py:tiny_factory:make`)."""

import torch
from torch import nn


class TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 32))
        self.proj = nn.Linear(32, 8)

    def forward(self, features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.proj(self.encoder(features)) * scale


def make():
    torch.manual_seed(0)
    return TwoTower().eval(), {"features": torch.randn(2, 5, 12), "scale": torch.ones(2, 1, 1)}
