"""Expected failures through the CLI: one `error:` line (what failed, which path, what to do), exit 2, no
traceback, nothing left behind. Covers outputs on a read-only / full / forbidden disk, broken model
directories, a failing `py:` factory, and a model the ONNX exporter cannot export.

Tests run as root here, where a chmod'ed directory does not stop writes; `unwritable` patches the file
functions instead, as a read-only mount would answer (EROFS / EACCES on create, ENOSPC when a finished
file is moved into place).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run


@pytest.fixture
def unwritable(monkeypatch):
    """`unwritable(directory, code, late=False)`: writes under `directory` fail with `code`; with `late`, only
    the final rename into place fails (the disk filled up while writing)."""

    def install(directory: Path, code: int, late: bool = False) -> None:
        root = str(Path(directory).resolve())

        def inside(path) -> bool:
            try:
                return str(Path(os.fsdecode(path)).resolve()).startswith(root)
            except TypeError:  # a file descriptor
                return False

        def fail(path):
            raise OSError(code, os.strerror(code), os.fsdecode(path))

        real_replace, real_rename = os.replace, os.rename

        def replace(src, dst, *a, **k):
            if inside(dst):
                fail(dst)
            return real_replace(src, dst, *a, **k)

        def rename(src, dst, *a, **k):
            if inside(dst):
                fail(dst)
            return real_rename(src, dst, *a, **k)

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)
        if late:
            return
        real_open, real_mkdir, real_io_open = os.open, os.mkdir, io.open

        def os_open(path, flags, *a, **k):
            if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                fail(path)
            return real_open(path, flags, *a, **k)

        def mkdir(path, *a, **k):
            if inside(path):
                if os.path.exists(path):
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(path))
                fail(path)
            return real_mkdir(path, *a, **k)

        def py_open(file, mode="r", *a, **k):
            if not isinstance(file, int) and inside(file) and any(c in mode for c in "wax+"):
                fail(file)
            return real_io_open(file, mode, *a, **k)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(io, "open", py_open)
        monkeypatch.setattr(builtins, "open", py_open)

    return install


def _left(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture(scope="module")
def branched_graph(export_cache):
    return export_cache("gpt2")


BENCH = "bench sample:gpt2 --backends ort --modes base --batch 1 --seq-len 4 --iters 2 --warmup 1".split()
WRITERS = {
    "merge-and-export": lambda o, ad, g: ["merge-and-export", "sample:gpt2", "--adapter", ad, "-o", o / "m.onnx"],
    "export-branched": lambda o, ad, g: ["export-branched", "sample:gpt2", "-o", o / "b.onnx", "--no-verify"],
    "optimize": lambda o, ad, g: ["optimize", g, "-o", o / "opt.onnx"],
    "pack-adapter": lambda o, ad, g: ["pack-adapter", ad, "-o", o / "a.onnx_adapter"],
    "make-adapter": lambda o, ad, g: ["make-adapter", "sample:gpt2", "-o", o / "adapter"],
    "verify --json": lambda o, ad, g: ["verify", "sample:gpt2", "--onnx", g, "--shapes", "1x4", "--json", o / "r.json"],
    "bench --json": lambda o, ad, g: [*BENCH, "--json", o / "b.json"],
}


@pytest.mark.parametrize("command", sorted(WRITERS))
@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_unwritable_output_is_one_line(unwritable, adapter_dir, branched_graph, tmp_path, command, code):
    out = tmp_path / "out"
    out.mkdir()
    unwritable(out, code)
    result = run(*WRITERS[command](out, adapter_dir, branched_graph), ok=False)
    assert_one_line_error(result, rf"cannot write {out}.*\[errno {code}\]; ")
    assert _left(out) == []


def test_disk_full_when_moving_into_place_leaves_nothing(unwritable, adapter_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    unwritable(out, errno.ENOSPC, late=True)
    result = run("merge-and-export", "sample:gpt2", "--adapter", adapter_dir, "-o", out / "m.onnx", ok=False)
    assert_one_line_error(result, r"cannot write .*m\.onnx: No space left on device.*disk is full")
    assert _left(out) == []  # no graph, no manifest, no temp files


@pytest.fixture(scope="module")
def gpt2_dir(sample_cache, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "gpt2"
    sample_cache("gpt2").module.save_pretrained(str(path))
    return path


def test_truncated_model_weights(gpt2_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(gpt2_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run("merge-and-export", bad, "-o", tmp_path / "m.onnx", ok=False)
    # the checkpoint headers are read before any work (lazy load, streamed export)
    assert_one_line_error(result, rf"cannot read {bad}/model\.safetensors .*damaged or missing, re-save the model")
    assert not (tmp_path / "m.onnx").exists()


def test_config_field_of_the_wrong_type(gpt2_dir, tmp_path):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(gpt2_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "n_layer": "two"}))
    result = run("merge-and-export", bad, "-o", tmp_path / "m.onnx", ok=False)
    assert_one_line_error(result, rf"cannot load {bad} as a transformers model .*config\.json")
    assert not (tmp_path / "m.onnx").exists()


def test_failing_factory_one_line_and_traceback_only_with_verbose(tmp_path):
    args = ["merge-and-export", "py:failing_factories:broken", "-o", tmp_path / "m.onnx"]
    result = run(*args, ok=False)
    assert_one_line_error(result, r"the factory raised RuntimeError: factory exploded on purpose")
    assert "failing_factories.py" not in result.output
    verbose = run("--verbose", *args, ok=False)
    assert verbose.exit_code == 2
    assert "Traceback" in verbose.stderr and "failing_factories.py" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "m.onnx").exists()


def test_exporter_failure_is_exit_2_not_a_traceback(tmp_path):
    """T5 returns an EncoderDecoderCache, which torch.onnx.export cannot handle: exit 2 (bad input), never 1
    (verification failed), one line, no file."""
    out = tmp_path / "t5.onnx"
    result = run("merge-and-export", "py:failing_factories:t5", "-o", out, ok=False)
    assert_one_line_error(result, r"torch\.onnx\.export cannot export py:failing_factories:t5: .*EncoderDecoderCache")
    assert _left(tmp_path) == []


def test_two_adapters_to_merge_and_export_refused(adapter_dir, tmp_path):
    out = tmp_path / "m.onnx"
    result = run(
        "merge-and-export", "sample:gpt2", "--adapter", adapter_dir, "--adapter", adapter_dir, "-o", out, ok=False
    )
    assert_one_line_error(result, r"merge-and-export folds one adapter into the weights, got 2 .*--layout bank")
    assert _left(tmp_path) == []


def test_non_finite_alpha_refused_by_name(adapter_dir, tmp_path):
    import json
    import shutil

    result = run("make-adapter", "sample:gpt2", "-o", tmp_path / "ad", "--alpha", "nan", ok=False)
    assert_one_line_error(result, r"--alpha nan: lora_alpha must be a finite number")
    bad = tmp_path / "bad"
    shutil.copytree(adapter_dir, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": float("inf")}))
    out = tmp_path / "x.onnx_adapter"
    assert_one_line_error(run("pack-adapter", bad, "-o", out, ok=False), r"lora_alpha=inf is not a finite number")
    assert not out.exists() and not (tmp_path / "ad").exists()


@pytest.mark.parametrize("name", ["", "   ", None, 3])
def test_session_adapter_names_are_non_empty_strings(export_cache, adapter_dir, name):
    from lora_export.errors import UserError
    from lora_export.runtime import LoraSession

    with LoraSession(export_cache("gpt2")) as session:
        with pytest.raises(UserError, match=r"adapter name .*: give a non-empty string"):
            session.load_adapter(name, adapter_dir)
        assert session.adapters() == []


def test_closed_session_says_so(export_cache, adapter_dir, sample_cache):
    from lora_export.errors import UserError
    from lora_export.runtime import LoraSession
    from lora_export.verify.check import make_feeds

    session = LoraSession(export_cache("gpt2"))
    session.load_adapter("a", adapter_dir)
    session.close()
    feeds = make_feeds(sample_cache("gpt2"), 1, 4, 0)
    for call in (lambda: session.run(feeds, adapter="a"), lambda: session.load_adapter("b", adapter_dir)):
        with pytest.raises(UserError, match=r"LoraSession on .* is closed: open a new LoraSession"):
            call()
