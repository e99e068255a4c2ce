"""Models: local transformers directories, `py:module:factory`, and the embedded sample zoo."""

from lora_export.models.loading import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
