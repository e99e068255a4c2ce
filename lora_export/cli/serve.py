"""serve."""

from __future__ import annotations

import click

from lora_export.cli import display
from lora_export.cli.app import cli


@cli.command("serve")
@click.argument("folder", metavar="DIR", type=click.Path(file_okay=False))
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="NAME=PATH",
    help="An adapter to serve as model NAME (PEFT dir or .onnx_adapter). Repeatable; more can be loaded at "
    "run time with POST /v1/load_lora_adapter.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP proxy listens on.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option(
    "--replicas",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Engine replicas (spread over the cluster's nodes).",
)
@click.option(
    "--max-replicas-per-node", type=click.IntRange(1), default=None, help="At most this many replicas on one node."
)
@click.option(
    "--proxy-location",
    type=click.Choice(["EveryNode", "HeadOnly"]),
    default=None,
    help="Where Ray Serve runs its HTTP proxies on a cluster (default Serve's: EveryNode; HeadOnly: one entry "
    "point, on the head node).",
)
@click.option(
    "--max-batch-size", type=click.IntRange(1), default=32, show_default=True, help="Rows in one running batch."
)
@click.option(
    "--batch-wait-ms",
    type=click.FloatRange(0),
    default=10.0,
    show_default=True,
    help="How long a new batch waits for more requests before its first forward.",
)
@click.option("--address", default=None, help="Join this Ray cluster (default: $RAY_ADDRESS, else start a local one).")
@click.option("--api-key", default=None, envvar="LORA_EXPORT_API_KEY", help="Require 'Authorization: Bearer KEY'.")
@click.option("--model-name", default=None, help="The base model's name in the API (default: the folder's name).")
@click.option(
    "--no-folder-adapters",
    is_flag=True,
    help="Do not serve the folder's own adapters/NAME.onnx_adapter files (served as NAME by default).",
)
@click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime threads per replica.")
@click.option(
    "--max-request-bytes",
    type=click.IntRange(1024),
    default=4 * 2**20,
    show_default=True,
    help="Bigger request bodies are answered 413 before they are read whole.",
)
@click.option(
    "--adapter-dir",
    "adapter_dirs",
    multiple=True,
    type=click.Path(file_okay=False),
    help="Register every PEFT adapter directory (and .onnx_adapter file) under DIR by its name; each is loaded "
    "when a request first names it. Repeatable.",
)
@click.option(
    "--max-cpu-adapters",
    type=click.IntRange(1),
    default=None,
    help="Adapters a replica keeps loaded (least recently used unloaded first; as vLLM's --max-cpu-loras).",
)
@click.option(
    "--max-adapters-per-batch",
    type=click.IntRange(1),
    default=None,
    help="Distinct adapters in one batch (bank folders; as vLLM's --max-loras); rows of others wait their turn.",
)
@click.option(
    "--allow-runtime-adapters",
    is_flag=True,
    help="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (off by default, as vLLM).",
)
@click.option(
    "--adapter-root",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="With --allow-runtime-adapters: load only adapters inside this directory (relative lora_path under it).",
)
@click.option(
    "--cpus-per-replica", type=click.FloatRange(0), default=1.0, show_default=True, help="Ray CPUs a replica reserves."
)
@click.option(
    "--debug-step-delay-ms",
    "step_delay_ms",
    type=click.FloatRange(0),
    default=0.0,
    hidden=True,
    help="Drills: every decode step takes at least this long (disconnect and fault tests on a fast machine).",
)
def serve(
    folder,
    adapters,
    host,
    port,
    replicas,
    max_replicas_per_node,
    proxy_location,
    max_batch_size,
    batch_wait_ms,
    address,
    api_key,
    model_name,
    no_folder_adapters,
    threads,
    max_request_bytes,
    adapter_dirs,
    max_cpu_adapters,
    max_adapters_per_batch,
    allow_runtime_adapters,
    adapter_root,
    cpus_per_replica,
    step_delay_ms,
):
    """Serve a decoder folder (export-decoder) with an OpenAI-compatible API on Ray Serve; the request's
    `model` names the adapter, and rows for different adapters share one forward (bank folders). Ctrl-C
    stops the application and the Ray instance it started."""
    from lora_export import api
    from lora_export.serving import parse_adapter_option

    named = parse_adapter_option(adapters)
    options = dict(
        model_name=model_name,
        host=host,
        port=port,
        replicas=replicas,
        max_replicas_per_node=max_replicas_per_node,
        proxy_location=proxy_location,
        max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms,
        address=address,
        api_key=api_key,
        threads=threads,
        cpus_per_replica=cpus_per_replica,
        folder_adapters=not no_folder_adapters,
        step_delay_ms=step_delay_ms,
        max_request_bytes=max_request_bytes,
        allow_runtime_adapters=allow_runtime_adapters,
        adapter_root=adapter_root,
        adapter_dirs=list(adapter_dirs),
        max_cpu_adapters=max_cpu_adapters,
        max_adapters_per_batch=max_adapters_per_batch,
    )

    def ready(url: str, models: list[str]) -> None:
        names = ", ".join(models[:8]) + (f" and {len(models) - 8} more" if len(models) > 8 else "")
        display.err.print(f"[green]✓[/green] serving {url} (models: {names}); Ctrl-C to stop", highlight=False)

    try:
        interrupted = api.serve(folder, adapters=named, on_ready=ready, **options)
    except KeyboardInterrupt:  # a second Ctrl-C during startup: what was started is stopped all the same
        interrupted = True
    display.err.print("stopped", highlight=False)
    if interrupted:
        raise click.exceptions.Exit(130)  # as the shell reports a command ended by Ctrl-C
