"""`lora-export serve` for real: the CLI in a subprocess (one local Ray instance for the module, stopped with
Ctrl-C at the end and checked to leave nothing running), talked to with the official `openai` package.

Every reply is compared with the offline generator's greedy tokens for the same prompt and adapter."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
import time
from pathlib import Path

import httpx2
import openai
import pytest
from serve_helpers import ServerProcess, free_port
from serve_oracle import DecoderFixture

KEY = "test-key"
STEP_MS = 20  # every decode step takes at least this long (serve --debug-step-delay-ms): on any machine, a long
# generation outlasts a client that gives up early, so the disconnect test cannot race the machine's speed
MAX_BYTES = 64 * 1024  # serve --max-request-bytes
SAMPLES = Path(__file__).resolve().parents[1] / "samples"


@pytest.fixture(scope="module")
def decoder(serve_decoder) -> DecoderFixture:
    return serve_decoder


@pytest.fixture(scope="module")
def server(decoder, tmp_path_factory):
    port = free_port()
    args = [str(decoder.folder), "--port", str(port), "--api-key", KEY, "--max-batch-size", "16"]
    args += ["--batch-wait-ms", "30", "--threads", "1", "--debug-step-delay-ms", str(STEP_MS)]
    args += ["--allow-runtime-adapters", "--max-request-bytes", str(MAX_BYTES)]
    # ad0..ad3 are in the folder (served as they are); ad0 is also given as its PEFT dir (that one wins);
    # ad4 is loaded at run time
    args += ["--adapter", f"ad0={decoder.adapters['ad0']}"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("serve_log"))
    proc.url = f"http://127.0.0.1:{port}/v1"
    yield proc
    code, alive = proc.stop()
    assert code == 130, f"serve did not stop cleanly on Ctrl-C (exit {code}, want 130):\n{proc.tail()}"
    assert not alive, f"left running after Ctrl-C: {[p.pid for p in alive]}"


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def _ids(choice) -> list[int]:
    return list(choice.model_extra["token_ids"])


def stats(server) -> dict:
    return httpx2.get(server.url.removesuffix("/v1") + "/stats", headers={"Authorization": f"Bearer {KEY}"}).json()


def test_models_lists_base_and_adapters(client, decoder):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {decoder.base_name, *decoder.adapter_names[:4]}
    assert models[decoder.adapter_names[0]].parent == decoder.base_name
    assert models[decoder.base_name].model_extra["max_model_len"] == decoder.context_length


@pytest.mark.parametrize("which", [None, 0, 1])
def test_completion_equals_offline_greedy_and_stream_equals_it_too(client, decoder, which):
    model = decoder.base_name if which is None else decoder.adapter_names[which]
    adapter = None if which is None else decoder.adapter_names[which]
    prompt = decoder.prompts[3 + (which or 0)]
    want = decoder.greedy(prompt, adapter, 20)
    others = [decoder.greedy(prompt, a, 20) for a in (None, *decoder.adapter_names[:2]) if a != adapter]
    assert all(o != want for o in others)  # the adapters really change the tokens: a mix-up would show
    reply = client.completions.create(
        model=model, prompt=prompt, max_tokens=20, temperature=0, extra_body={"return_token_ids": True}
    )
    choice = reply.choices[0]
    assert _ids(choice) == want
    assert choice.text == decoder.decode(want)
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == len(want)
    assert choice.finish_reason == ("stop" if want[-1] in decoder.eos and len(want) < 20 else "length")

    chunks = list(
        client.completions.create(
            model=model, prompt=prompt, max_tokens=20, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"return_token_ids": True},
        )
    )  # fmt: skip
    streamed = [t for c in chunks if c.choices for t in _ids(c.choices[0])]
    assert streamed == want
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert len([c for c in chunks if c.choices and len(_ids(c.choices[0]))]) > 1  # it really streamed
    assert chunks[-1].usage.completion_tokens == len(want) and not chunks[-1].choices


def test_text_prompt_and_chat_use_the_folders_tokenizer(client, decoder):
    text = "The quick brown fox"
    ids = decoder.encode(text)
    name = decoder.adapter_names[2]
    reply = client.completions.create(model=name, prompt=text, max_tokens=12, temperature=0)
    assert reply.choices[0].text == decoder.decode(decoder.greedy(ids, name, 12))

    messages = [{"role": "user", "content": "héllo wörld"}]
    chat = client.chat.completions.create(
        model=name, messages=messages, max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
    )
    want = decoder.greedy(decoder.chat_ids(messages), name, 12)
    assert chat.choices[0].model_extra["token_ids"] == want
    assert chat.choices[0].message.content == decoder.decode(want) and chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0, stream=True)
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == chat.choices[0].message.content


def test_seeded_sampling_equals_the_offline_generator(client, decoder):
    prompt, name = decoder.prompts[5], decoder.adapter_names[3]
    knobs = dict(temperature=0.8, top_p=0.9, seed=1234)
    want = decoder.generator.generate([prompt], adapter=name, max_new_tokens=16, **knobs).tokens[0]
    got = [
        _ids(client.completions.create(
            model=name, prompt=prompt, max_tokens=16, **knobs, extra_body={"return_token_ids": True}
        ).choices[0])
        for _ in range(2)
    ]  # fmt: skip
    assert got[0] == got[1] == want
    assert want != decoder.greedy(prompt, name, 16)  # it really sampled


def test_stop_string_ends_the_reply_before_it(client, decoder):
    prompt, name = decoder.prompts[7], decoder.adapter_names[1]
    full = decoder.decode(decoder.greedy(prompt, name, 24))
    stop = next((full[i : i + 2] for i in range(4, len(full) - 2) if full[i : i + 2].strip()), None)
    if stop is None:
        pytest.skip("the reference text has no usable stop string")
    reply = client.completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    assert reply.choices[0].text == full[: full.index(stop)] and reply.choices[0].finish_reason == "stop"


def test_32_concurrent_requests_over_4_adapters_and_base_each_get_their_own_tokens(server, decoder):
    models = [decoder.base_name, *decoder.adapter_names[:4]]
    jobs = [(models[i % 5], decoder.prompts[i % len(decoder.prompts)], 10 + i % 7) for i in range(32)]
    before = stats(server)["total"]

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=300) as c:
            calls = [
                c.completions.create(
                    model=m, prompt=p, max_tokens=n, temperature=0, extra_body={"return_token_ids": True}
                )
                for m, p, n in jobs
            ]
            return await asyncio.gather(*calls)

    replies = asyncio.run(asyncio.wait_for(run(), 300))
    for (model, prompt, n), reply in zip(jobs, replies):
        adapter = None if model == decoder.base_name else model
        assert _ids(reply.choices[0]) == decoder.greedy(prompt, adapter, n), model
    after = stats(server)["total"]
    assert after["finished"] - before["finished"] == 32
    mixed = (after["mixed_batches"] - before["mixed_batches"]) + (after["mixed_joins"] - before["mixed_joins"])
    assert mixed >= 1 and after["mixed_steps"] > before["mixed_steps"]
    assert after["max_rows"] >= 8  # rows really shared forwards


def _admin(server, path: str, body: dict):
    return httpx2.post(f"{server.url}/{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def test_load_use_unload_while_in_flight(client, server, decoder):
    name = decoder.adapter_names[4]
    prompt = decoder.prompts[1]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=name, prompt=prompt, max_tokens=4, temperature=0)
    n = decoder.context_length - 16
    assert n * STEP_MS / 1000 > 10 * 0.2  # the generation takes 10x longer than the client waits, however fast

    def long_request(i, started):
        stream = client.completions.create(
            model=name, prompt=decoder.prompts[i][:8], max_tokens=n, temperature=0, stream=True,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )  # fmt: skip
        out = []
        for c in stream:
            if c.choices:
                out += _ids(c.choices[0])
                started.set()
        return out

    # The race is the point (unload while rows run), so the server's own count says whether it happened:
    # `deferred_unloads` grows when the unload reaches the replica while requests still use the adapter.
    # On a loaded machine the rows may all finish first; then the round is repeated with more rows.
    for inflight in (8, 16, 32):
        r = _admin(server, "load_lora_adapter", {"lora_name": name, "lora_path": str(decoder.adapters[name])})
        assert r.status_code == 200, r.text
        assert name in {m.id for m in client.models.list().data}
        reply = client.completions.create(
            model=name, prompt=prompt, max_tokens=8, temperature=0, extra_body={"return_token_ids": True}
        )
        assert _ids(reply.choices[0]) == decoder.greedy(prompt, name, 8)

        before = stats(server)["total"]
        started = [threading.Event() for _ in range(inflight)]
        with concurrent.futures.ThreadPoolExecutor(inflight) as pool:
            futures = [pool.submit(long_request, i % len(decoder.prompts), e) for i, e in enumerate(started)]
            assert all(e.wait(120) for e in started)  # every request is generating
            r = _admin(server, "unload_lora_adapter", {"lora_name": name})
            assert r.status_code == 200, r.text
            with pytest.raises(openai.NotFoundError) as e:  # the next request for it, while the others run
                client.completions.create(model=name, prompt=prompt, max_tokens=4, temperature=0)
            assert e.value.body["code"] == "model_not_found"
            results = [f.result(timeout=300) for f in futures]
        for i, got in enumerate(results):  # the in-flight requests kept their adapter to the end
            assert got == decoder.greedy(decoder.prompts[i % len(decoder.prompts)][:8], name, n, ignore_eos=True)
        after = stats(server)["total"]
        if after["deferred_unloads"] > before["deferred_unloads"]:
            break
    else:
        pytest.fail("every in-flight request had finished before the unload reached the replica, three times")
    assert not any(k.startswith(f"{name}@") for k in stats(server)["replicas"].popitem()[1]["adapters_resident"])
    r = _admin(server, "unload_lora_adapter", {"lora_name": name})
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def _post(server, body: bytes | dict, key: str | None = KEY, path: str = "/completions"):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    kw = {"json": body} if isinstance(body, dict) else {"content": body}
    return httpx2.post(server.url + path, headers=headers, timeout=60, **kw)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, server, decoder):
    ok = {"model": decoder.base_name, "prompt": decoder.prompts[0], "max_tokens": 3, "temperature": 0}
    cases = {
        "unknown model": (_post(server, {**ok, "model": "nope"}), 404, "model"),
        "prompt over the context": (_post(server, {**ok, "prompt": [5] * (decoder.context_length + 1)}), 400, "prompt"),
        "prompt + max_tokens over the context": (
            _post(server, {**ok, "prompt": [5] * 10, "max_tokens": decoder.context_length}), 400, "max_tokens",
        ),
        "negative max_tokens": (_post(server, {**ok, "max_tokens": -1}), 400, "max_tokens"),
        "temperature out of range": (_post(server, {**ok, "temperature": 7}), 400, "temperature"),
        "token id out of vocabulary": (_post(server, {**ok, "prompt": [10**6]}), 400, "prompt"),
        "unsupported n": (_post(server, {**ok, "n": 2}), 400, "n"),
        "malformed JSON": (_post(server, b'{"model": "x", "prompt": [1,'), 400, None),
        "not an object": (_post(server, b"[1, 2]"), 400, None),
        "missing prompt": (_post(server, {"model": decoder.base_name}), 400, "prompt"),
        "wrong key": (_post(server, ok, key="wrong"), 401, None),
        "no key": (_post(server, ok, key=None), 401, None),
        "load with a bad path": (
            _post(server, {"lora_name": "x", "lora_path": "/no/such/adapter"}, path="/load_lora_adapter"), 400, None,
        ),
        "load under the base name": (
            _post(server, {"lora_name": decoder.base_name, "lora_path": "/x"}, path="/load_lora_adapter"), 400, None,
        ),
        # hostile or loose input: a 4xx naming the parameter, never a 500 with the server's internals
        "negative seed with sampling": (_post(server, {**ok, "seed": -1, "temperature": 1.0}), 400, "seed"),
        "lone surrogate": (_post(server, b'{"model": "m", "prompt": "abc\\ud800def"}'), 400, "prompt"),
        "nested 30,000 deep": (_post(server, b"{\"prompt\": " + b"[" * 30_000 + b"]" * 30_000 + b"}"), 400, None),
        "max_tokens as a string": (_post(server, {**ok, "max_tokens": "8"}), 400, "max_tokens"),
        "max_tokens as a bool": (_post(server, {**ok, "max_tokens": True}), 400, "max_tokens"),
        "NaN temperature": (_post(server, b'{"model": "m", "prompt": "x", "temperature": NaN}'), 400, "temperature"),
        "unknown field": (_post(server, {**ok, "frobnicate": 1}), 400, "frobnicate"),
        "response_format": (_post(server, {**ok, "response_format": {"type": "json_object"}}), 400, "response_format"),
        "top_logprobs": (_post(server, {**ok, "top_logprobs": 3}), 400, "top_logprobs"),
        "repetition_penalty": (_post(server, {**ok, "repetition_penalty": 1.3}), 400, "repetition_penalty"),
        "min_p": (_post(server, {**ok, "min_p": 0.1}), 400, "min_p"),
        "tool_choice": (
            _post(server, {"model": decoder.base_name, "messages": [{"role": "user", "content": "hi"}],
                           "tool_choice": "auto"}, path="/chat/completions"), 400, "tool_choice",
        ),
    }  # fmt: skip
    for what, (r, status, param) in cases.items():
        assert r.status_code == status, (what, r.status_code, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], what
        assert error["type"] == "invalid_request_error", what
        if param is not None:
            assert error["param"] == param, (what, error)
    leaks = ("Traceback", 'File "', "\x1b[", "pid=", "RayTaskError", "ray::", "/work/", "/tmp/")
    for r, *_ in cases.values():  # nothing of the server reaches a client
        assert not any(leak in r.text for leak in leaks), r.text
    assert cases["unknown model"][0].json()["error"]["code"] == "model_not_found"
    assert cases["wrong key"][0].json()["error"]["code"] == "invalid_api_key"

    # through the openai client: its typed errors
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=[1], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=decoder.base_name, prompt=[1], max_tokens=-5)
    with openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()

    reply = client.completions.create(**ok, extra_body={"return_token_ids": True})  # still serving
    assert _ids(reply.choices[0]) == decoder.greedy(decoder.prompts[0], None, 3)


def test_oversized_bodies_are_refused_before_they_are_read(server, decoder):
    big = {"model": decoder.base_name, "prompt": "x" * (MAX_BYTES + 10), "max_tokens": 1}
    r = _post(server, big)
    assert r.status_code == 413 and "max-request-bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit holds on the bytes received
        yield b'{"model": "m", "prompt": "'
        for _ in range(MAX_BYTES // 4096 + 2):
            yield b"x" * 4096
        yield b'"}'

    r = httpx2.post(server.url + "/completions", content=chunks(), timeout=60,
                    headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 413
    ok = _post(server, {"model": decoder.base_name, "prompt": decoder.prompts[0], "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200  # and it keeps serving


def test_openai_defaults_and_greedy_near_zero(client, decoder):
    prompt = decoder.prompts[1]
    none = client.completions.create(model=decoder.base_name, prompt=prompt, max_tokens=None, temperature=0)
    assert none.usage.completion_tokens <= 16  # max_tokens null: OpenAI's 16, not the whole context
    tiny = client.completions.create(model=decoder.base_name, prompt=prompt, max_tokens=8, temperature=5e-324,
                                     extra_body={"return_token_ids": True})  # fmt: skip
    assert _ids(tiny.choices[0]) == decoder.greedy(prompt, None, 8)[: len(_ids(tiny.choices[0]))]


def test_rays_own_routes_need_the_key(server):
    """Ray Serve's proxy answers `/-/routes` and `/-/healthz` itself: with --api-key they need the key too."""
    root = server.url.removesuffix("/v1")
    for path in ("/-/routes", "/-/healthz"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx2.get(root + path, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
        assert httpx2.get(root + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=30).status_code == 200
    assert httpx2.get(root + "/health", timeout=30).status_code == 200  # the one probe without a key


def test_models_show_no_server_paths(client):
    for card in client.models.list().data:
        assert not str(card.model_extra.get("root", "")).startswith("/"), card


def test_client_sample_runs_against_the_server(server, decoder, capsys):
    sys.path.insert(0, str(SAMPLES))
    try:
        import openai_client
    finally:
        sys.path.remove(str(SAMPLES))
    names = decoder.adapter_names[:2]
    texts = openai_client.main(["--base-url", server.url, "--api-key", KEY, "--adapters", *names, "--max-tokens", "10"])
    ids = decoder.encode("Once upon a time")
    assert texts[names[0]] == decoder.decode(decoder.greedy(ids, names[0], 10))
    assert texts["streamed"] == texts[names[1]] == decoder.decode(decoder.greedy(ids, names[1], 10))
    assert "streamed == non-streamed: True" in capsys.readouterr().out


def test_a_client_that_goes_away_frees_its_row(client, server, decoder):
    before = stats(server)["total"]
    n = decoder.context_length - 16
    assert n * STEP_MS / 1000 > 10 * 0.2  # the generation takes 10x longer than the client waits, however fast
    body = dict(
        model=decoder.adapter_names[1], prompt=decoder.prompts[2][:8], max_tokens=n, extra_body={"ignore_eos": True}
    )
    stream = client.completions.create(**body, stream=True)
    next(iter(stream))
    stream.close()  # streaming: the connection closes after the first chunk
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.2).completions.create(**body)  # non-streaming: the client gives up
    deadline = time.monotonic() + 60
    while stats(server)["total"]["cancelled"] - before["cancelled"] < 2:
        assert time.monotonic() < deadline, "the abandoned requests were not cancelled"
        time.sleep(0.1)
    after = stats(server)["total"]
    assert after["tokens"] - before["tokens"] < 2 * n  # they stopped early, not at max_tokens
