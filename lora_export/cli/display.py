"""Terminal output: rich tables on stdout, step spinners on stderr (quiet when not a terminal)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import click
from rich.console import Console
from rich.table import Table

out = Console(soft_wrap=True, width=None if Console().is_terminal else 160)
err = Console(stderr=True)


class Steps:
    """`with steps("tracing") as update:` shows a spinner, then a check line with the elapsed time;
    `update(done, total, detail)` (bytes) adds the progress of a long write to the spinner's line."""

    def __enter__(self) -> Steps:
        self.timings: dict[str, float] = {}
        return self

    def __exit__(self, *exc) -> None:
        pass

    @contextlib.contextmanager
    def __call__(self, label: str) -> Iterator[Callable[[int, int, str], None]]:
        t0 = time.perf_counter()
        with err.status(f"{label}...", spinner="dots") as status:

            def update(done: int, total: int, detail: str = "") -> None:
                share = f" {done / 1e9:.2f}/{total / 1e9:.2f} GB" if total else ""
                status.update(f"{label}...{share} {detail}".rstrip())

            yield update
        self.timings[label] = time.perf_counter() - t0
        err.print(f"[green]✓[/green] {label} [dim]({self.timings[label]:.1f}s)[/dim]")


def table(title: str, columns: list[str], rows: list[list], *, caption: str | None = None) -> None:
    t = Table(title=title, caption=caption, show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[_fmt(v) for v in r])
    out.print(t)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if (abs(v) < 1e-3 or abs(v) >= 1e4) and v != 0 else f"{v:.4f}".rstrip("0").rstrip(".")
    if v is None:
        return "-"
    return str(v)


def parity_table(report) -> None:
    rows = []
    for case in report.cases:
        for o in case.outputs:
            rows.append(
                [
                    case.label,
                    o.name,
                    o.max_abs,
                    o.max_rel,
                    o.mean_abs,
                    o.cosine,
                    o.top1_agreement,
                    f"{o.atol:.2g}" + (f" + {o.rtol:.2g}·|ref|" if o.rtol else ""),
                    "[green]pass[/green]" if o.passed else f"[red]FAIL[/red] {o.reason}",
                ]
            )
    table(
        f"parity: {report.candidate} vs {report.reference}",
        ["inputs", "output", "max abs", "max rel", "mean abs", "cosine", "top-1", "tolerance", "result"],
        rows,
    )
    if report.method:
        out.print(f"ran: {report.method}")
    for name, check in report.checks.items():
        mark = "[green]pass[/green]" if check.get("passed", True) else f"[red]FAIL[/red] {check.get('reason', '')}"
        details = ", ".join(f"{k}={_fmt(v)}" for k, v in check.items() if k not in ("passed", "reason"))
        out.print(f"{name}: {details} {mark}")


@contextlib.contextmanager
def progress_bars():
    """A `progress(what, done, total)` callback drawing rich progress bars on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )
    tasks: dict[str, int] = {}

    def update(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = bars.add_task(what, total=total)
        bars.update(tasks[what], completed=done, total=total)

    with bars:
        yield update


def demo_summary(result) -> None:
    """What `lora-export demo` shows: one input, three rows of one batch, then the task scores."""
    from rich.markup import escape

    out.print(f"\n[bold]input[/bold] (a meaning representation from the test split):\n  {escape(result.mr)}\n")
    for label, text in result.texts.items():
        torch_text = result.torch_texts.get(label)
        same = "" if torch_text == text else f"  [red]PyTorch: {escape(str(torch_text))}[/red]"
        out.print(f"[bold]{escape(label)}[/bold]\n  {escape(text) or '(nothing)'}{same}")
    first = next(iter(result.scores.values()), None)
    variant = f" ({first.meteor_variant})" if first else ""
    rows = [
        [escape(label), f"{s.bleu:.1f}", f"{s.rouge_l:.1f}", f"{s.meteor:.1f}"] for label, s in result.scores.items()
    ]
    n = first.n if first else 0
    table(
        f"task scores on {n} test items (ONNX Runtime, greedy)",
        ["row", "BLEU", "ROUGE-L", f"METEOR{variant}"],
        rows,
        caption="the base model is scored against the description references",
    )
    verdict = "[green]identical[/green]" if result.matches_torch else "[red]DIFFERENT[/red]"
    out.print(
        f"model: {result.parameters:,} parameters; each adapter {result.lora_parameters:,} LoRA parameters "
        f"({100 * result.lora_parameters / max(1, result.parameters):.1f}%)\n"
        f"folder: {result.folder} (one graph, adapters per row)\n"
        f"ONNX Runtime vs PyTorch texts: {verdict}\n"
        f"[dim]a model of {result.parameters / 1e6:.2f}M parameters learns the task's form, not its facts: wrong "
        "facts in the texts above are the model's, not the export's; the check that matters is the line "
        "above (the ONNX folder generates what PyTorch + PEFT generate)[/dim]"
    )


def task_table(report) -> None:
    """`verify --task`: per adapter, the folder's scores over PyTorch + PEFT's on the same items."""
    rows = []
    for c in report.comparisons:
        ok = c.passed(report.mode, report.tolerance)
        for label, s in (("deployment", c.deployment), ("PyTorch + PEFT", c.reference)):
            rows.append([c.adapter or "(none)", label, f"{s.bleu:.1f}", f"{s.rouge_l:.1f}", f"{s.meteor:.1f}", s.n])
        d = c.deltas()
        verdict = "[green]pass[/green]" if ok else "[red]FAIL[/red]"
        rows.append(
            [
                "",
                f"difference: {c.same_text}/{c.n} same text" + (f", {len(c.ties)} tie(s)" if c.ties else ""),
                f"{d['bleu']:+.1f}",
                f"{d['rouge_l']:+.1f}",
                f"{d['meteor']:+.1f}",
                verdict,
            ]
        )
        if c.first_difference and not ok:
            f = c.first_difference
            err.print(f"{c.adapter or '(none)'}: item {f['item']}: deployment {f['deployment']!r}")
            err.print(f"{' ' * len(c.adapter or '(none)')}  item {f['item']}: PEFT       {f['reference']!r}")
    variant = report.comparisons[0].reference.meteor_variant if report.comparisons else ""
    quant = f", {report.quantization} base" if report.quantization else ""
    table(
        f"task {report.task} ({report.split}): {report.folder} ({report.layout}{quant}, {report.dtype})",
        ["adapter", "row", "BLEU", "ROUGE-L", f"METEOR ({variant})", "items"],
        rows,
        caption=f"{report.mode}: " + _criterion(report) + f"; {report.seconds:.0f} s",
    )


def _criterion(report) -> str:
    if report.mode == "exact":
        return "text equal to PEFT's (or a float32 tie in PEFT's logits)"
    return f"|score difference| <= {report.tolerance:g}"


def finish_generation_report(report) -> None:
    """The generation check's table and verdict; exit 1 when it failed."""
    rows = [
        [
            c.label,
            " ".join(str(n) for n in c.prompt_lengths),
            sum(m is None for m in c.first_mismatch),
            len(c.first_mismatch),
            c.max_logits_err,
            c.atol,
            c.agreement,
            c.effect,
            "[green]pass[/green]" if c.passed else f"[red]FAIL[/red] {c.reason}",
        ]
        for c in report.cases
    ]
    table(
        f"generation: {report.new_tokens} greedy tokens vs transformers generate",
        [
            "case",
            "prompt lengths",
            "rows exact",
            "rows",
            "max logits err",
            "logits atol",
            "token agreement",
            "adapter effect",
            "result",
        ],
        rows,
    )
    tolerances = [c.tolerance for c in report.cases if c.tolerance]
    if tolerances:
        from lora_export.verify.tolerance import Tolerance

        loosest = max(tolerances, key=lambda t: t["atol"])
        out.print(f"logits tolerance (fp32, from the logits' scale and noise): {Tolerance(**loosest).describe()}")
    if not report.passed:
        err.print("[red]generation check failed[/red]")
        raise click.exceptions.Exit(1)
    if report.quantization:
        worst = min(c.agreement for c in report.cases)
        out.print(f"[green]verified[/green] ({report.quantization} base): greedy-token agreement >= {worst:.3f}")
        return
    out.print("[green]verified[/green]: token-exact with transformers generate")
