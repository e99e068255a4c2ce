"""Latency plot: p50 bars per backend/mode, grouped by shape, with p90 and p99 whiskers (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from lora_export.artifacts.fileio import atomic_path
from lora_export.bench.report import BenchReport


def plot_latency(report: BenchReport, out: str | Path, *, title: str | None = None) -> list[str]:
    """Write a PNG; returns the series labels ("backend/mode") in legend order."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    shapes = sorted({(r.batch, r.seq) for r in report.rows})
    series = []
    for r in report.rows:
        label = f"{r.backend}/{r.mode}"
        if label not in series:
            series.append(label)
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 1.1 * len(shapes) * max(len(series), 1) * 0.6), 4.5))
    try:
        for k, label in enumerate(series):
            xs, p50, up90, up99 = [], [], [], []
            for j, shape in enumerate(shapes):
                row = next(
                    (r for r in report.rows if f"{r.backend}/{r.mode}" == label and (r.batch, r.seq) == shape), None
                )
                if row is None:
                    continue
                xs.append(j - 0.4 + width * (k + 0.5))
                p50.append(row.stats.p50)
                up90.append(max(row.stats.p90 - row.stats.p50, 0.0))
                up99.append(max(row.stats.p99 - row.stats.p50, 0.0))
            ax.bar(xs, p50, width * 0.9, label=label)
            ax.errorbar(xs, p50, yerr=[[0] * len(xs), up99], fmt="none", ecolor="0.45", elinewidth=0.8, capsize=2)
            ax.errorbar(xs, p50, yerr=[[0] * len(xs), up90], fmt="none", ecolor="k", elinewidth=1.8, capsize=4)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"batch {b}, seq {s}" for b, s in shapes])
        ax.set_ylabel("latency, ms (bar p50; whiskers p90 thick, p99 thin)")
        ax.set_title(title or f"{report.model}: latency per backend and mode")
        ax.legend(fontsize="small")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out, suffix=".png") as tmp:  # no partial PNG if saving fails
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return series
