"""Peak memory and wall time of the exports at realistic sizes (random weights, saved as a local directory first).

Its command line is `tools/bench_scale.py`.

For each shape: write a transformers checkpoint with random weights (safetensors shards, written one tensor at a
time), a random r=8 adapter with `make-adapter`, then run each CLI command in a fresh process and read its peak
resident set size from the kernel (`wait4` rusage: file-backed pages a process maps count too; this process stays
small, since Linux starts a child's high-water mark from its parent's) and its wall time:
`merge-and-export` (with its verify, `--no-verify`, and its verify `--by-layer`), `export-branched` (inputs
and bank layouts, with their verify) and `export-decoder` (merged, with its generation check, and
`--no-verify`). The ratio is peak RSS / fp32 weight bytes; the Python + torch + onnxruntime start-up (measured
too) is included. Time is reported as wall and CPU seconds (user + system of the child: steadier than wall on a
shared machine); a least-squares fit of peak and time against the parameter count (with its R², the linearity
check) extrapolates to 7-8B models. A command is skipped (and says so) when the machine has not got the memory
free that it would need. Temp directories are deleted at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lora_export

ROOT = Path(lora_export.__file__).resolve().parents[1]  # the children's PYTHONPATH: this checkout

SHAPES = {
    "gpt2-small": ("gpt2", "GPT2LMHeadModel", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)),
    "gpt2-medium": ("gpt2", "GPT2LMHeadModel", dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257)),
    "gpt2-large": ("gpt2", "GPT2LMHeadModel", dict(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257)),
    "llama-1b": (  # TinyLlama-1.1B's shape
        "llama",
        "LlamaForCausalLM",
        dict(
            num_hidden_layers=22,
            hidden_size=2048,
            intermediate_size=5632,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        ),
    ),
}
MODE_NAMES = (
    "merge-and-export",
    "merge-and-export --no-verify",
    "merge-and-export --by-layer",
    "export-branched",
    "export-branched --layout bank",
    "export-decoder",
    "export-decoder --no-verify",
)
# each mode: the command, the model, the adapter, the output, then the mode's own flags
MODES = {
    m: [m.split()[0], "{model}", "--adapter", "{adapter}", "-o", "{out}", "--force", *m.split()[1:]] for m in MODE_NAMES
}
SHARD_BYTES = 512 << 20


def write_checkpoint(shape: str, out: Path) -> tuple[int, int]:
    """A transformers directory with random weights, written shard by shard; returns (parameters, bytes)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from lora_export.models.skeleton import params_on_meta

    arch, cls_name, cfg = SHAPES[shape]
    config = transformers.AutoConfig.for_model(arch, **cfg)
    config.architectures = [cls_name]
    with params_on_meta():
        model = getattr(transformers, cls_name)(config)
    out.mkdir(parents=True)
    config.save_pretrained(out)
    g = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, files = {}, {}, 0, []
    n_params = n_bytes = 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update(dict.fromkeys(shard, name))
            shard, shard_bytes = {}, 0

    for name, p in model.named_parameters():  # tied weights once, under their first name
        if p.dim() >= 2:
            t = torch.randn(p.shape, generator=g) * 0.02
        elif name.endswith("weight"):
            t = 1 + torch.randn(p.shape, generator=g) * 0.01  # norm scales
        else:
            t = torch.randn(p.shape, generator=g) * 0.01
        shard[name] = t
        shard_bytes += t.numel() * 4
        n_params += t.numel()
        n_bytes += t.numel() * 4
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    index = {"metadata": {"total_size": n_bytes}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return n_params, n_bytes


def run_measured(args: list[str], env: dict[str, str], timeout: float, cwd: Path) -> dict:
    """Run one command; its peak RSS (kernel rusage of exactly this child) and wall time. `cwd` must not hold a
    checkout: `python -m` puts it before PYTHONPATH."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd)
    deadline = t0 + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return {
        "rc": proc.returncode,
        "peak_rss": usage.ru_maxrss * 1024,
        "wall_s": wall,
        "cpu_s": cpu,
        "tail": output[-600:],
    }


def machine() -> dict:
    """Memory available, load, and this process's own resident set (kept small: see `main`)."""
    import psutil

    vm = psutil.virtual_memory()
    return {
        "available_gb": round(vm.available / 1e9, 1),
        "load_1min": round(os.getloadavg()[0], 1),
        "parent_rss_gb": round(psutil.Process().memory_info().rss / 1e9, 2),
    }


def fit(xs: list[float], ys: list[float]) -> tuple[float, float, float] | None:
    """Least squares y = a + b x, and its R² (1.0: the points lie on the line)."""
    if len(xs) < 2:
        return None
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return a, b, (1 - ss_res / ss_tot) if ss_tot else 1.0


# the checkpoint is written in a child process: python -c WRITE_CHECKPOINT SHAPE DIR prints [parameters, bytes]
WRITE_CHECKPOINT = (
    "import json, sys; from pathlib import Path; from lora_export.bench.scale import write_checkpoint; "
    "print(json.dumps(write_checkpoint(sys.argv[1], Path(sys.argv[2]))))"
)


@dataclass
class ScaleBenchOptions:
    shapes: str = ",".join(SHAPES)
    modes: str = ",".join(MODES)
    workdir: str | None = None  # where checkpoints and graphs go (default: a temp dir)
    baseline: str | None = None  # another checkout of lora-export to run the same commands with
    baseline_shapes: str = "gpt2-small"
    headroom: float = 1.0  # GB to leave free for others
    timeout: float = 3600
    json: str | None = None
    markdown: str | None = None


def run_scale_bench(args: ScaleBenchOptions) -> int:
    """Every shape x mode (see the module docstring); 0 when every command succeeded."""
    python = sys.executable
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
    startup = run_measured(
        [python, "-c", "import torch, onnxruntime, transformers, lora_export.api"], env, args.timeout, work
    )
    rows: list[dict] = []
    print(f"start-up (python + torch + onnxruntime + transformers): {startup['peak_rss'] / 1e9:.2f} GB", flush=True)
    try:
        for shape in args.shapes.split(","):
            ckpt, adapter = work / shape, work / f"{shape}.adapter"
            t0 = time.perf_counter()
            # in a child: this process stays small, because a child's kernel peak RSS starts from its parent's
            # (Linux carries the RSS high-water mark of the forking process across exec)
            made_ckpt = subprocess.run(
                [python, "-c", WRITE_CHECKPOINT, shape, str(ckpt)],
                env=env,
                cwd=work,
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            assert made_ckpt.returncode == 0, made_ckpt.stderr[-2000:]
            params, nbytes = json.loads(made_ckpt.stdout.strip().splitlines()[-1])
            print(
                f"{shape}: {params / 1e6:.0f}M parameters, {nbytes / 1e9:.2f} GB fp32 "
                f"(checkpoint written in {time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
            made = run_measured(
                [python, "-m", "lora_export", "make-adapter", str(ckpt), "-o", str(adapter), "--r", "8", "--force"],
                env,
                args.timeout,
                work,
            )
            assert made["rc"] == 0, made["tail"]
            runs = [("this checkout", env)]
            if args.baseline and shape in args.baseline_shapes.split(","):
                runs.append(("baseline", {**env, "PYTHONPATH": str(Path(args.baseline).resolve())}))
            for code, run_env in runs:
                for mode in args.modes.split(","):
                    free = machine()
                    need = nbytes * (7 if code == "baseline" else 1.6) / 1e9 + args.headroom
                    row = {
                        "shape": shape,
                        "code": code,
                        "mode": mode,
                        "parameters": params,
                        "weight_bytes": nbytes,
                        **free,
                    }
                    if free["available_gb"] < need:
                        row["skipped"] = f"needs ~{need:.1f} GB free, {free['available_gb']} GB available"
                        print(f"  {code} {mode}: skipped ({row['skipped']})", flush=True)
                        rows.append(row)
                        continue
                    out = work / f"{shape}.onnx"
                    cmd = [a.format(model=ckpt, adapter=adapter, out=out) for a in MODES[mode]]
                    res = run_measured([python, "-m", "lora_export", *cmd], run_env, args.timeout, work)
                    row.update(
                        rc=res["rc"],
                        peak_rss=res["peak_rss"],
                        wall_s=round(res["wall_s"], 1),
                        cpu_s=round(res["cpu_s"], 1),
                        ratio=round(res["peak_rss"] / nbytes, 2),
                    )
                    if res["rc"] != 0:
                        row["tail"] = res["tail"]
                    print(
                        f"  {code} {mode}: peak {res['peak_rss'] / 1e9:.2f} GB = {row['ratio']}x weights, "
                        f"{row['wall_s']}s wall, {row['cpu_s']}s CPU, rc {res['rc']} "
                        f"(available before: {free['available_gb']} GB, "
                        f"load {free['load_1min']})",
                        flush=True,
                    )
                    rows.append(row)
                    for f in work.glob(f"{shape}.onnx*"):  # a graph and its data, or a decoder folder
                        shutil.rmtree(f) if f.is_dir() else f.unlink()
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(adapter, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    report = {"startup_rss": startup["peak_rss"], "rows": rows, "extrapolation": extrapolate(rows)}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    text = markdown(report)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0 if all(r.get("rc", 0) == 0 for r in rows) else 1


def extrapolate(rows: list[dict]) -> dict:
    """Per mode: peak = a + b·weight bytes and wall = c + d·parameters, evaluated at 7B and 8B (fp32 weights)."""
    out = {}
    for mode in MODES:
        done = [r for r in rows if r["mode"] == mode and r["code"] == "this checkout" and r.get("rc") == 0]
        peak = fit([r["weight_bytes"] for r in done], [r["peak_rss"] for r in done])
        wall = fit([r["parameters"] for r in done], [r["wall_s"] for r in done])
        cpu = fit([r["parameters"] for r in done if "cpu_s" in r], [r["cpu_s"] for r in done if "cpu_s" in r])
        if peak is None or wall is None:
            continue
        out[mode] = {
            "peak_per_weight_byte": round(peak[1], 3),
            "peak_intercept_gb": round(peak[0] / 1e9, 2),
            "peak_r2": round(peak[2], 4),
            "seconds_per_billion_parameters": round(wall[1] * 1e9, 1),
            "wall_r2": round(wall[2], 4),
            **(
                {"cpu_seconds_per_billion_parameters": round(cpu[1] * 1e9, 1), "cpu_r2": round(cpu[2], 4)}
                if cpu
                else {}
            ),
            "points": len(done),
            **{
                f"{n}B": {
                    "peak_gb": round((peak[0] + peak[1] * n * 4e9) / 1e9, 1),
                    "wall_min": round((wall[0] + wall[1] * n * 1e9) / 60, 1),
                }
                for n in (7, 8)
            },
        }
    return out


def markdown(report: dict) -> str:
    lines = [
        f"Start-up RSS (python + torch + onnxruntime + transformers): {report['startup_rss'] / 1e9:.2f} GB",
        "",
        "| shape | parameters | fp32 weights | code | command | peak RSS | peak / weights | wall | CPU | "
        "available before | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        peak = f"{r['peak_rss'] / 1e9:.2f} GB" if "peak_rss" in r else r.get("skipped", "")
        ratio = f"{r['ratio']}x" if "ratio" in r else "-"
        wall = f"{r['wall_s']} s" + ("" if r.get("rc", 0) == 0 else f" (rc {r['rc']})") if "wall_s" in r else "-"
        lines.append(
            f"| {r['shape']} | {r['parameters'] / 1e6:.0f}M | {r['weight_bytes'] / 1e9:.2f} GB | {r['code']} | "
            f"`{r['mode']}` | {peak} | {ratio} | {wall} | {r['cpu_s']} s | {r['available_gb']} GB | {r['load_1min']} |"
            if "cpu_s" in r
            else f"`{r['mode']}` | {peak} | {ratio} | {wall} | - | {r['available_gb']} GB | {r['load_1min']} |"
        )
    if report["extrapolation"]:
        lines += [
            "",
            "| command | points | peak ≈ a + b·weights (R²) | wall per 1B params (R²) | CPU per 1B params (R²) | "
            "7B: peak, wall | 8B: peak, wall |",
            "|---|---|---|---|---|---|---|",
        ]
        for mode, e in report["extrapolation"].items():
            cpu = f"{e['cpu_seconds_per_billion_parameters']} s ({e['cpu_r2']})" if "cpu_r2" in e else "-"
            lines.append(
                f"| `{mode}` | {e['points']} | {e['peak_intercept_gb']} GB + {e['peak_per_weight_byte']}·W "
                f"({e['peak_r2']}) | {e['seconds_per_billion_parameters']} s ({e['wall_r2']}) | {cpu} | "
                f"{e['7B']['peak_gb']} GB, {e['7B']['wall_min']} min | {e['8B']['peak_gb']} GB, "
                f"{e['8B']['wall_min']} min |"
            )
    return "\n".join(lines) + "\n"
