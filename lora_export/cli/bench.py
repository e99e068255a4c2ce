"""bench: latency per backend, mode and shape, interleaved, with ratios to references."""

from __future__ import annotations

from pathlib import Path

import click

from lora_export import api
from lora_export.cli import display
from lora_export.cli.app import cli
from lora_export.cli.options import model_argument, nonfinite_option, parse_ints, write_json_report
from lora_export.errors import UserError


def _csv(value: str, flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UserError(f"{flag} {value!r}: expected a comma-separated list")
    return items


@cli.command("bench")
@model_argument
@click.option("--adapter", "adapters", multiple=True, help="Adapter dir(s); the first is used by merged/branched.")
@click.option("--backends", default="torch,ort", show_default=True, help="Comma list of torch, ort, trt.")
@click.option(
    "--modes", default="base,merged,branched", show_default=True, help="Comma list of base, merged, branched, bank."
)
@click.option("--batch", "batches", default="1", show_default=True, help="Comma list of batch sizes.")
@click.option("--seq-len", "seqs", default="128", show_default=True, help="Comma list of sequence lengths.")
@click.option("--warmup", type=click.IntRange(0), default=5, show_default=True, help="Untimed rounds first.")
@click.option("--iters", type=click.IntRange(1), default=30, show_default=True, help="Timed calls per candidate.")
@click.option("--threads", type=click.IntRange(1), default=None, help="Intra-op threads (torch and ONNX Runtime).")
@click.option("--input-sets", type=click.IntRange(1), default=3, show_default=True, help="Input sets rotated per call.")
@click.option(
    "--reference",
    default="base",
    show_default=True,
    help="Ratio reference: MODE (same backend) or BACKEND:MODE. Ratios to PyTorch eager are always shown.",
)
@click.option("--bank-size", type=click.IntRange(1), default=4, show_default=True, help="Adapters in the bank mode.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for inputs and random adapters.")
@click.option("--provider", "providers", multiple=True, help="ONNX Runtime execution provider(s).")
@click.option("--device", default="cpu", show_default=True, help="PyTorch device: cpu or cuda[:N].")
@click.option("--workdir", type=click.Path(file_okay=False), default=None, help="Keep the exported graphs here.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), default=None, help="Write a markdown table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write a PNG latency plot.")
@nonfinite_option
def bench(
    model,
    adapters,
    backends,
    modes,
    batches,
    seqs,
    warmup,
    iters,
    threads,
    input_sets,
    reference,
    bank_size,
    seed,
    providers,
    device,
    workdir,
    json_path,
    md_path,
    plot_path,
    allow_nonfinite,
):
    """Measure latency (p50/p90/p99), tokens/s and ratios for each backend x mode x shape.

    Candidates at one shape are timed interleaved in one process, on pre-made inputs rotated between
    several sets. Graphs for ort/trt are exported first (to a temp dir, or --workdir), outside timing.
    Without --adapter a random adapter (seeded) is made. Example:

        lora-export bench sample:gpt2-small --backends torch,ort --modes base,merged,branched,bank --batch 1,8
    """
    from lora_export.artifacts.fileio import atomic_path, probe_writable
    from lora_export.bench.report import TABLE_COLUMNS, machine_line, table_rows, to_markdown
    from lora_export.bench.sweep import BenchConfig

    config = BenchConfig(
        backends=_csv(backends, "--backends"),
        modes=_csv(modes, "--modes"),
        batches=parse_ints(batches, "--batch"),
        seqs=parse_ints(seqs, "--seq-len"),
        warmup=warmup,
        iters=iters,
        threads=threads,
        input_sets=input_sets,
        reference=reference,
        seed=seed,
        providers=list(providers) or None,
        device=device,
    )
    config.check()
    for path in (json_path, md_path, plot_path):  # reports that cannot be written fail now, not after the run
        probe_writable(path)
    with display.progress_bars() as progress:
        report = api.bench(
            model,
            list(adapters),
            config=config,
            bank_size=bank_size,
            workdir=workdir,
            allow_nonfinite=allow_nonfinite,
            on_progress=progress,
        )
    report.command = (
        f"lora-export bench {model} --backends {','.join(config.backends)} --modes {','.join(config.modes)} "
        f"--batch {batches} --seq-len {seqs} --warmup {warmup} --iters {iters}"
        + (f" --threads {threads}" if threads else "")
        + "".join(f" --adapter {a}" for a in adapters)
    )
    display.table(f"bench: {model}", TABLE_COLUMNS, table_rows(report), caption=machine_line(report.machine))
    from rich.markup import escape

    for n in report.notes:
        display.err.print(f"[yellow]note:[/yellow] {escape(n)}")
    write_json_report(json_path, report.to_dict())
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(md_path, suffix=".md") as tmp:
            tmp.write_text(to_markdown(report))
    if plot_path:
        from lora_export.bench.plot import plot_latency

        plot_latency(report, plot_path)
        display.err.print(f"plot written to {plot_path}")
