"""LoraSession edge cases: stale caches on reload, per-row validation, fp16 graphs, the feeds fallback."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import make_random_adapter

from lora_export.errors import AdapterError, UserError
from lora_export.export.branched import export_branched
from lora_export.runtime import LoraSession
from lora_export.runtime import adapter_store as session_mod
from lora_export.verify.check import make_feeds


@pytest.fixture(scope="module")
def gpt2_bank(sample_cache, tmp_path_factory):
    loaded = sample_cache("gpt2")
    path = tmp_path_factory.mktemp("bank") / "bank.onnx"
    export_branched(loaded, path, layout="bank", max_rank=8)
    return loaded, path


def _torch_ref(loaded, adapter, feeds):
    from lora_export.backends.torch_runner import TorchRunner

    with TorchRunner(loaded, adapter) as t:
        return t.infer(feeds)["logits"]


def test_reload_during_bank_stacking_never_serves_stale_weights(gpt2_bank, monkeypatch):
    loaded, path = gpt2_bank
    old, new = make_random_adapter(loaded, seed=1, name="x"), make_random_adapter(loaded, seed=2, name="x")
    feeds = make_feeds(loaded, 2, 6, 0)
    with LoraSession(path) as sess:
        sess.load_adapter("x", old)
        real = session_mod.bank_feeds
        calls = {"n": 0}

        def stack_while_reloaded(adapters, slots):
            stacked = real(adapters, slots)  # stacks the old weights...
            if calls["n"] == 0:
                sess.load_adapter("x", new)  # ...while another thread reloads "x"
            calls["n"] += 1
            return stacked

        monkeypatch.setattr(session_mod, "bank_feeds", stack_while_reloaded)
        sess.run(feeds, adapters=["x", "x"])  # this call may use either; the cache must not keep the old one
        got = sess.run(feeds, adapters=["x", "x"])["logits"]
    np.testing.assert_allclose(got, _torch_ref(loaded, new, feeds), atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(adapters=["x"]), r"adapters names 1 row\(s\) but the batch has 3"),
        (dict(adapters=[]), r"adapters names 0 row\(s\) but the batch has 3"),
        (dict(index=np.array([0.0, 0.0, 0.0])), "must be a 1-D integer array"),
        (dict(index=np.array([0, 0])), "has 2 entries but the batch has 3"),
        (dict(index=np.array([0, 5, -1])), r"adapter_index \[5\] out of range"),
        (dict(adapters=["x", "nope", None]), "no adapter named 'nope' is loaded"),
    ],
)
def test_bank_bad_rows_are_one_clear_error(gpt2_bank, kwargs, message):
    loaded, path = gpt2_bank
    feeds = make_feeds(loaded, 3, 5, 0)
    with LoraSession(path) as sess:
        sess.load_adapter("x", make_random_adapter(loaded, seed=1, name="x"))
        if "index" in kwargs:
            feeds["adapter_index"] = kwargs.pop("index")
        with pytest.raises((UserError, AdapterError), match=message):
            sess.run(feeds, **kwargs)


def test_concurrent_bank_runs_with_loads_and_unloads(gpt2_bank):
    loaded, path = gpt2_bank
    adapters = {n: make_random_adapter(loaded, seed=s, name=n) for s, n in enumerate(("a", "b", "c"))}
    feeds = make_feeds(loaded, 3, 5, 1)
    refs = {n: _torch_ref(loaded, a, feeds) for n, a in adapters.items()}
    base = _torch_ref(loaded, None, feeds)
    errors: list[str] = []
    with LoraSession(path) as sess:
        for n, a in adapters.items():
            sess.load_adapter(n, a)
        stop = threading.Event()

        def churn() -> None:  # a temporary adapter comes and goes while the others serve
            extra = make_random_adapter(loaded, seed=9, name="tmp")
            while not stop.is_set():
                sess.load_adapter("tmp", extra)
                sess.unload("tmp")

        def worker(t: int) -> None:
            names = ("a", "b", "c")
            for i in range(15):
                rows = [names[(t + i) % 3], None, names[(t + i + 1) % 3]]
                got = sess.run(feeds, adapters=rows)["logits"]
                for r, name in enumerate(rows):
                    want = refs[name][r] if name else base[r]
                    if not np.allclose(got[r], want, atol=1e-4):
                        errors.append(f"thread {t} call {i} row {r} ({name})")

        churner = threading.Thread(target=churn)
        churner.start()
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        churner.join()
    assert not errors, errors[:5]


def test_fp16_branched_graph_with_the_session_and_feeds_fallback(sample_cache, tmp_path):
    loaded = sample_cache("gpt2")
    adapter = make_random_adapter(loaded, seed=4)
    path = export_branched(loaded, tmp_path / "b16.onnx", adapters=[adapter], dtype="fp16").path
    feeds = make_feeds(loaded, 2, 7, 2)
    ref = _torch_ref(loaded, adapter, feeds)
    base = _torch_ref(loaded, None, feeds)
    for use_ort_adapters in (True, False):
        with LoraSession(path, use_ort_adapters=use_ort_adapters) as sess:
            sess.load_adapter("x", adapter)
            got = sess.run(feeds, adapter="x")["logits"].astype(np.float32)
        assert got.dtype == np.float32 and np.abs(got - ref).max() < 3e-2
        assert np.abs(ref - base).max() > 10 * np.abs(got - ref).max()  # the adapter's effect is visible in fp16


def test_unload_removes_the_packed_file(sample_cache, export_cache):
    loaded = sample_cache("gpt2")
    with LoraSession(export_cache("gpt2")) as sess:
        sess.load_adapter("x", make_random_adapter(loaded, seed=1))
        folder = sess.store.folder
        import os

        assert len(os.listdir(folder)) == 1
        sess.load_adapter("x", make_random_adapter(loaded, seed=2))  # replaced: the old file goes
        assert len(os.listdir(folder)) == 1
        sess.unload("x")
        assert os.listdir(folder) == []


def test_the_bank_cache_is_bounded_in_bytes(gpt2_bank, monkeypatch):
    """Stacked banks are cached per set of adapters, at most BANK_CACHE sets and BANK_CACHE_BYTES: with many adapters
    sets rarely recur, so an uncapped cache grows by one stacked bank per set."""
    loaded, path = gpt2_bank
    with LoraSession(path) as sess:
        for i in range(4):
            sess.load_adapter(f"a{i}", make_random_adapter(loaded, seed=i, name=f"a{i}"))
        store = sess.store
        one = session_mod._nbytes(store.bank_feeds(["a0"]))
        monkeypatch.setattr(session_mod, "BANK_CACHE_BYTES", int(2.5 * one))  # room for two one-adapter sets
        for name in ("a1", "a2", "a3"):
            store.bank_feeds([name, None])
        assert [k[0][0] for k in store._bank_cache] == ["a2", "a3"]
        assert sum(map(session_mod._nbytes, store._bank_cache.values())) <= 2.5 * one
        big = store.bank_feeds(["a0", "a1", "a2", "a3"])  # alone over the budget: used, not kept
        assert big["adapter_index"].tolist() == [0, 1, 2, 3]
        assert [k[0][0] for k in store._bank_cache] == ["a2", "a3"]
