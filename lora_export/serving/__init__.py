"""Serving many adapters: an OpenAI-compatible server on Ray Serve over a decoder folder.

    scheduler (plain Python)  ->  engine (one replica: decoder + tokenizer + scheduler thread)
                               ->  Ray Serve app (ingress: HTTP + adapter table; engine replicas)

`serve(ServeConfig(...))` is what `lora-export serve` runs; `Scheduler` works without Ray or HTTP.
"""

from lora_export.serving.config import ServeConfig, parse_adapter_option
from lora_export.serving.launch import serve, wait_ready
from lora_export.serving.scheduler import Request, SamplingParams, Scheduler

__all__ = ["Request", "SamplingParams", "Scheduler", "ServeConfig", "parse_adapter_option", "serve", "wait_ready"]
