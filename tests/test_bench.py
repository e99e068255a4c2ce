"""Bench reports, ratios, markdown, the plot, and the `bench` command in-process on the tiny sample."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_export.bench.latency import summarize
from lora_export.bench.report import BenchReport, BenchRow, fill_ratios, machine_info, table_rows, to_markdown
from lora_export.cli import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(backend, mode, batch, seq, p50):
    stats = summarize(f"{backend}/{mode}", [p50 * 0.9, p50, p50 * 1.3], tokens=batch * seq)
    return BenchRow(backend, mode, batch, seq, stats)


def _report() -> BenchReport:
    rows = [
        _row("torch", "base", 1, 16, 10.0),
        _row("torch", "branched", 1, 16, 13.0),
        _row("ort", "base", 1, 16, 4.0),
        _row("ort", "merged", 1, 16, 4.1),
        _row("ort", "branched", 1, 16, 4.2),
        _row("ort", "bank", 1, 16, 4.4),
        _row("ort", "base", 8, 16, 20.0),
        _row("ort", "merged", 8, 16, 21.0),
    ]
    fill_ratios(rows)
    return BenchReport("sample:gpt2", ["a0"], machine_info(), {"warmup": 1, "iters": 3}, rows, ["a note"])


def test_ratios_to_same_backend_base_and_to_torch():
    rep = _report()
    merged = rep.find("ort", "merged", 1, 16)
    assert merged.reference == "ort/base" and merged.vs_reference == pytest.approx(4.1 / 4.0)
    branched = rep.find("ort", "branched", 1, 16)
    assert branched.torch_reference == "torch/branched" and branched.vs_torch == pytest.approx(4.2 / 13.0)
    assert merged.torch_reference == "torch/base"  # no torch/merged row: falls back to eager base
    assert rep.find("ort", "merged", 8, 16).vs_torch is None  # no torch row at that shape
    assert merged.speedup_vs_torch == pytest.approx(10.0 / 4.1)
    rows = list(rep.rows)
    fill_ratios(rows, reference="torch:base")
    assert rows[3].reference == "torch/base" and rows[3].vs_reference == pytest.approx(0.41)


def test_report_round_trips_through_json():
    rep = _report()
    data = json.loads(json.dumps(rep.to_dict()))
    back = BenchReport.from_dict(data)
    assert back.to_dict() == rep.to_dict()
    assert back.rows[0].stats.samples_ms == rep.rows[0].stats.samples_ms
    with pytest.raises(ValueError):
        BenchReport.from_dict({**data, "schema": "something else"})
    m = rep.machine
    assert m["cores"] >= 1 and m["cpu"] and m["torch"] and m["onnxruntime"] and "tensorrt" in m


def test_markdown_and_table_rows():
    rep = _report()
    md = to_markdown(rep)
    assert md.count("\n| ort |") == 6 and "| torch | branched |" in md
    assert "a note" in md and "Machine:" in md and "p99 ms" in md
    rows = table_rows(rep)
    assert len(rows) == len(rep.rows) and rows[3][8].startswith("1.025")


def test_plot_is_a_png_with_one_series_per_backend_mode(tmp_path):
    from lora_export.bench.plot import plot_latency

    out = tmp_path / "p" / "lat.png"
    series = plot_latency(_report(), out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert series == ["torch/base", "torch/branched", "ort/base", "ort/merged", "ort/branched", "ort/bank"]
    import matplotlib.image

    img = matplotlib.image.imread(out)
    assert img.shape[0] > 100 and img.shape[1] > 100


def test_bench_cli_in_process(tmp_path):
    j, md, png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    args = [
        "bench",
        "sample:gpt2",
        "--backends",
        "torch,ort,trt",
        "--modes",
        "base",
        "--batch",
        "1,2",
        "--seq-len",
        "8",
        "--warmup",
        "1",
        "--iters",
        "3",
        "--threads",
        "1",
        "--workdir",
        str(tmp_path / "w"),
        "--json",
        str(j),
        "--markdown",
        str(md),
        "--plot",
        str(png),
    ]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    data = json.loads(j.read_text())
    rep = BenchReport.from_dict(data)
    keys = {(r.backend, r.mode, r.batch) for r in rep.rows}
    assert keys == {(b, "base", n) for b in ("torch", "ort") for n in (1, 2)}
    assert all(r.stats.iters == 3 for r in rep.rows)
    assert rep.settings["threads"]["torch_threads"] == 1 and rep.settings["threads"]["ort_intra_op_threads"] == 1
    assert any("random adapter" in n for n in rep.notes)
    assert any(n.startswith("trt skipped") for n in rep.notes)  # no TensorRT here: a note, not a crash
    assert rep.find("ort", "base", 1, 8).vs_reference == 1.0
    assert rep.find("ort", "base", 2, 8).vs_torch is not None
    assert (tmp_path / "w" / "base.onnx").exists()
    assert png.read_bytes()[:8] == PNG_MAGIC and "| ort | base |" in md.read_text()
    assert "p50" in res.output and "tokens/s" in res.output


def test_bench_bank_mode_on_prepared_graphs(sample_cache, export_cache, tmp_path):
    from conftest import make_random_adapter

    from lora_export.bench.sweep import BenchConfig, run_bench

    loaded = sample_cache("gpt2")
    ads = [make_random_adapter(loaded, seed=i) for i in range(3)]
    cfg = BenchConfig(backends=["torch", "ort"], modes=["branched", "bank"], batches=[4], seqs=[8], warmup=1, iters=2)
    graphs = {"branched": export_cache("gpt2", "inputs"), "bank": export_cache("gpt2", "bank")}
    rep = run_bench(loaded, ads[0], cfg, tmp_path, bank_adapters=ads, graphs=graphs)
    assert {r.key for r in rep.rows} == {"torch/branched/b4s8", "ort/branched/b4s8", "ort/bank/b4s8"}
    assert any("torch/bank skipped" in n for n in rep.notes)
    assert rep.adapters == [a.name for a in ads]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--modes", "base,nope"], 2, "--modes: unknown nope"),
        (["--backends", "tpu"], 2, "--backends: unknown tpu"),
        (["--batch", "1,x"], 2, "--batch"),
        (["--device", "tpu"], 2, "--device"),
        (["--device", "cuda", "--backends", "torch"], 3, "no CUDA device"),
    ],
)
def test_bench_bad_options_are_one_line_errors(args, code, message):
    import torch

    if code == 3 and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    res = CliRunner().invoke(cli, ["bench", "sample:gpt2", *args])
    assert res.exit_code == code
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.output


def test_bench_adapters_random_and_bank_padding(sample_cache):
    from conftest import make_random_adapter

    from lora_export.bench.sweep import bench_adapters

    loaded = sample_cache("gpt2")
    ads, bank, notes = bench_adapters(loaded, [], bank_size=4, seed=7)
    assert len(ads) == 1 and [a.name for a in bank] == ["random0", "random1", "random2", "random3"]
    assert all(float(abs(m.B).max()) > 0 for a in bank for m in a.modules.values())  # B non-zero
    assert len(notes) == 2 and "random adapter" in notes[0]
    given = [make_random_adapter(loaded, seed=1)]
    ads, bank, notes = bench_adapters(loaded, given, bank_size=0)
    assert ads == given and bank == given and notes == []
