"""A `py:tiny_factory:make` model: any torch module plus example inputs, not only transformers
(the model is `lora_export.models.two_tower`)."""

from lora_export.models.two_tower import TwoTower, make

__all__ = ["TwoTower", "make"]
