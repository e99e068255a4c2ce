"""Terminal output: rich tables on stdout, step spinners on stderr (quiet when not a terminal)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

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
                    "[green]pass[/green]" if o.passed else f"[red]FAIL[/red] {o.reason}",
                ]
            )
    table(
        f"parity: {report.candidate} vs {report.reference}",
        ["inputs", "output", "max abs", "max rel", "mean abs", "cosine", "top-1", "result"],
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
