"""Terminal output: rich tables on stdout, step spinners on stderr (quiet when not a terminal)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console
from rich.table import Table

out = Console(soft_wrap=True, width=None if Console().is_terminal else 160)
err = Console(stderr=True)


class Steps:
    """`with steps("tracing"):` shows a spinner, then a check line with the elapsed time."""

    def __enter__(self) -> Steps:
        self.timings: dict[str, float] = {}
        return self

    def __exit__(self, *exc) -> None:
        pass

    @contextlib.contextmanager
    def __call__(self, label: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with err.status(f"{label}...", spinner="dots"):
            yield
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
        f"ONNX Runtime vs PyTorch texts: {verdict}"
    )
