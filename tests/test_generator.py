"""The generator's batch-level API (prefill / step / join / drop), sampling, streaming, stops and threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from decoder_setup import PROMPTS, peft_generate

from lora_export.runtime import Generator, SamplingParams


@pytest.fixture(scope="module")
def gpt2(decoders):
    return decoders.model("gpt2")


@pytest.fixture(scope="module")
def bank(decoders):
    with Generator(decoders.folder("gpt2", "bank")) as gen:
        yield gen


@pytest.fixture(scope="module")
def inputs(decoders):
    with Generator(decoders.folder("gpt2", "inputs")) as gen:
        yield gen


def _greedy(gen, batch, steps, out):
    """`steps` greedy decode steps, appending each row's token to out[key]."""
    for _ in range(steps):
        tokens = np.argmax(batch.logits, axis=-1)
        for key, t in zip(batch.keys, tokens.tolist()):
            out.setdefault(key, []).append(t)
        gen.step(batch, tokens)


def test_rows_join_and_leave_a_running_batch_and_each_generates_as_alone(bank, gpt2):
    """Continuous batching: rows with different adapters and prompt lengths join at step boundaries and leave
    when done; every row's tokens equal PEFT generating that row alone with its adapter."""
    got: dict[str, list[int]] = {}
    batch = bank.prefill([PROMPTS[0]], adapters=["x"], keys=["a"])
    _greedy(bank, batch, 5, got)
    batch = bank.join(batch, bank.prefill([PROMPTS[1], PROMPTS[2]], adapters=["y", None], keys=["b", "c"]))
    assert batch.keys == ["a", "b", "c"] and batch.positions.tolist() == [12, 3, 5]
    _greedy(bank, batch, 4, got)
    batch = bank.drop(batch, [batch.row_of("a")])  # "a" is done after 9 tokens
    _greedy(bank, batch, 3, got)
    batch = bank.join(batch, bank.prefill([PROMPTS[0]], adapters=["y"], keys=["d"]))
    past_before = batch.past_length
    batch = bank.drop(batch, [batch.row_of("b"), batch.row_of("c")])
    assert batch.past_length < past_before  # columns only the dropped rows used are trimmed
    _greedy(bank, batch, 6, got)
    pm = gpt2["pm"]
    assert got["a"] == peft_generate(pm, PROMPTS[0], 9, "x")
    assert got["b"] == peft_generate(pm, PROMPTS[1], 7, "y")
    assert got["c"] == peft_generate(pm, PROMPTS[2], 7, None)
    assert got["d"] == peft_generate(pm, PROMPTS[0], 6, "y")


def test_without_io_binding_the_tokens_are_the_same(decoders):
    with Generator(decoders.folder("gpt2", "inputs"), io_binding=False) as plain:
        a = plain.generate(PROMPTS, adapter="x", max_new_tokens=8, ignore_eos=True).tokens
    with Generator(decoders.folder("gpt2", "inputs")) as bound:
        assert bound.generate(PROMPTS, adapter="x", max_new_tokens=8, ignore_eos=True).tokens == a


def test_switching_adapters_needs_no_new_session_and_8_threads_get_their_own_tokens(inputs):
    session = inputs.session
    names = ["x", "y", None, "x", "y", None, "x", "y"]
    alone = {n: inputs.generate(PROMPTS[0], adapter=n, max_new_tokens=10, ignore_eos=True).tokens for n in set(names)}
    assert len({tuple(t[0]) for t in alone.values()}) == 3  # three different continuations
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(names))

    def work(i: int, name: str | None) -> None:
        try:
            barrier.wait(timeout=30)
            for _ in range(3):
                results.setdefault(i, []).append(
                    inputs.generate(PROMPTS[0], adapter=name, max_new_tokens=10, ignore_eos=True).tokens
                )
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for i, name in enumerate(names):
        assert results[i] == [alone[name]] * 3, (i, name)
    assert inputs.session is session


def test_sampling_with_a_seed_is_reproducible_and_top_k_1_is_greedy(bank):
    kw = dict(max_new_tokens=12, ignore_eos=True)
    greedy = bank.generate(PROMPTS, adapters=["x", "y", None], **kw).tokens
    sampled = bank.generate(PROMPTS, adapters=["x", "y", None], temperature=1.0, top_p=0.9, seed=7, **kw).tokens
    assert sampled == bank.generate(PROMPTS, adapters=["x", "y", None], temperature=1.0, top_p=0.9, seed=7, **kw).tokens
    assert sampled != bank.generate(PROMPTS, adapters=["x", "y", None], temperature=1.0, top_p=0.9, seed=8, **kw).tokens
    assert sampled != greedy
    assert bank.generate(PROMPTS, adapters=["x", "y", None], temperature=1.0, top_k=1, seed=3, **kw).tokens == greedy
    # per-row parameters: a row samples the same tokens in a batch as alone
    rows = [SamplingParams(temperature=1.0, top_k=50, seed=s, **kw) for s in (1, 2, 3)]
    together = bank.generate(PROMPTS, adapters=["x", "y", None], sampling=rows).tokens
    for i, (p, a) in enumerate(zip(PROMPTS, ["x", "y", None])):
        assert together[i] == bank.generate(p, adapters=[a], sampling=rows[i]).tokens[0]


def test_stream_yields_tokens_as_they_come_and_stops_on_stop_tokens(inputs):
    full = inputs.generate(PROMPTS[2], adapter="y", max_new_tokens=10, ignore_eos=True)
    assert full.finish_reasons == ["length"] and len(full.tokens[0]) == 10 and full.ttft_ms > 0
    stream = inputs.stream(PROMPTS[2], adapter="y", max_new_tokens=10, ignore_eos=True)
    first = next(stream)  # a token arrives before generation is over
    assert (first.row, first.token, first.finish_reason) == (0, full.tokens[0][0], None)
    rest = list(stream)
    assert [e.token for e in rest] == full.tokens[0][1:] and rest[-1].finish_reason == "length"
    stop = full.tokens[0][3]
    cut = inputs.generate(PROMPTS[2], adapter="y", max_new_tokens=10, stop_token_ids=[stop], ignore_eos=True)
    assert cut.tokens[0] == full.tokens[0][: full.tokens[0].index(stop) + 1] and cut.finish_reasons == ["stop"]


def test_eos_stops_a_row_while_the_others_go_on(inputs):
    x = inputs.generate(PROMPTS, adapter="x", max_new_tokens=8, ignore_eos=True).tokens
    eos = x[1][2]  # pretend the second row's third token is the model's eos
    facts = inputs.facts
    saved = list(facts.eos_token_id)
    facts.eos_token_id = [eos]
    try:
        got = inputs.generate(PROMPTS, adapter="x", max_new_tokens=8)
    finally:
        facts.eos_token_id = saved
    assert got.tokens[1] == x[1][: x[1].index(eos) + 1] and got.finish_reasons[1] == "stop"
    for i in (0, 2):
        expected = x[i][: x[i].index(eos) + 1] if eos in x[i] else x[i]
        assert got.tokens[i] == expected


def test_step_and_join_refuse_what_they_cannot_do(inputs, bank):
    from lora_export.errors import UserError

    batch = inputs.prefill([PROMPTS[0]], adapter="x")
    with pytest.raises(UserError, match="rows with different adapters need a bank folder"):
        inputs.join(batch, inputs.prefill([PROMPTS[1]], adapter="y"))
    with pytest.raises(UserError, match="one token .* per row"):
        inputs.step(batch, [1, 2])
    with pytest.raises(UserError, match=r"drop: row\(s\) \[3\]"):
        inputs.drop(batch, [3])
    with pytest.raises(UserError, match="keys must stay unique"):
        bank.join(bank.prefill([PROMPTS[1]], keys=["k"]), bank.prefill([PROMPTS[2]], keys=["k"]))
    with pytest.raises(UserError, match="keys must name each"):
        bank.prefill([PROMPTS[1], PROMPTS[2]], keys=["k", "k"])
    empty = bank.drop(bank.prefill([PROMPTS[1]], adapters=["x"]), [0])
    assert empty.rows == 0
    assert bank.join(empty, bank.prefill([PROMPTS[1]], adapters=["y"])).rows == 1


def test_ort_ignores_run_options_adapters_with_io_binding(decoders):
    """Why the generator binds adapter tensors as inputs under IO binding: ONNX Runtime 1.32 applies a
    `RunOptions` LoraAdapter in `run` but not in `run_with_iobinding`. When this test fails, ORT has changed and
    the `.onnx_adapter` path could serve IO binding too."""
    import onnxruntime as ort

    folder = decoders.folder("gpt2", "inputs")
    with Generator(folder, io_binding=False) as gen:  # session.run + RunOptions: the adapter applies
        with_adapter = gen.prefill([PROMPTS[0]], adapter="x").logits
        base = gen.prefill([PROMPTS[0]]).logits
        lora = ort.LoraAdapter()
        lora.Load(str(folder / "adapters" / "x.onnx_adapter"))
        options = ort.RunOptions()
        options.add_active_adapter(lora)
        feeds = {"input_ids": np.array([PROMPTS[0]]), "attention_mask": np.ones((1, 7), np.int64)}
        feeds["position_ids"] = np.arange(7)[None]
        empty = np.zeros((1, gen.facts.num_key_value_heads, 0, gen.facts.head_size), np.float32)
        io = gen.session.io_binding()
        for name, value in {**feeds, **dict.fromkeys(gen.input_names[3:], empty)}.items():
            io.bind_cpu_input(name, value)
        io.bind_output("logits", "cpu")
        for name in gen.output_names[1:]:
            io.bind_output(name, "cpu")
        gen.session.run_with_iobinding(io, options)
        bound = io.get_outputs()[0].numpy()[:, -1]
    assert np.abs(with_adapter - base).max() > 1e-2
    np.testing.assert_allclose(bound, base, atol=1e-5)  # the adapter was silently not applied
