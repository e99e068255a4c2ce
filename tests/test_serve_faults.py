"""Faults, for real: `lora-export serve --replicas 2`, one engine replica's process killed (SIGKILL) while 32
requests are in flight. Its requests end at once with a retryable OpenAI 503 (a stream with a 503 error event),
none hangs; the survivor's rows finish with the offline generator's tokens; new requests are served meanwhile
(the official client retries a 503 by itself); Serve starts a replacement replica. Times are printed (-s)."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import openai
import pytest
from serve_helpers import ServerProcess, free_port

pytest.importorskip("ray")

TOKENS = 40
STEP_MS = 50  # serve --debug-step-delay-ms: every row is still running when the replica is killed


def _engines(server) -> list[int]:
    import psutil

    out = []
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if "ServeReplica" in " ".join(p.cmdline()) and "engine" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return sorted(out)


def test_a_killed_replica_costs_retryable_503s_and_is_replaced(serve_decoder, tmp_path):
    decoder = serve_decoder
    port = free_port()
    args = [str(decoder.folder), "--port", str(port), "--replicas", "2", "--max-batch-size", "16", "--threads", "1"]
    args += ["--debug-step-delay-ms", str(STEP_MS)]
    server = ServerProcess(args, tmp_path)
    url = f"http://127.0.0.1:{port}/v1"
    names = decoder.adapter_names[:2]
    try:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        client.completions.create(model=names[0], prompt=[1, 2, 3], max_tokens=2)  # both replicas are up
        deadline = time.monotonic() + 120
        while len(_engines(server)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        before = _engines(server)
        assert len(before) == 2

        def one(i: int):
            model, prompt = names[i % 2], decoder.prompts[i % len(decoder.prompts)]
            t0 = time.monotonic()
            try:
                if i % 8 == 0:  # some streams: a 503 mid-stream is an error event the client raises on
                    tokens = []
                    stream = client.completions.create(
                        model=model, prompt=prompt, max_tokens=TOKENS, temperature=0, stream=True,
                        extra_body={"ignore_eos": True, "return_token_ids": True},
                    )  # fmt: skip
                    for chunk in stream:
                        for c in chunk.choices:
                            tokens += c.model_extra.get("token_ids") or []
                    return "ok", time.monotonic() - t0, (model, prompt, tokens)
                reply = client.completions.create(
                    model=model, prompt=prompt, max_tokens=TOKENS, temperature=0,
                    extra_body={"ignore_eos": True, "return_token_ids": True},
                )  # fmt: skip
                return "ok", time.monotonic() - t0, (model, prompt, list(reply.choices[0].model_extra["token_ids"]))
            except openai.APIStatusError as e:
                return e.status_code, time.monotonic() - t0, str(e)
            except openai.APIError as e:  # an error event inside a stream
                return "stream error", time.monotonic() - t0, str(e)

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(one, i) for i in range(32)]
            time.sleep(1.5)  # every request accepted and generating (40 steps of >= 50 ms)
            os.kill(before[0], signal.SIGKILL)
            killed = time.monotonic()
            results = [f.result(timeout=90) for f in futures]  # none hangs
        ok = [r for r in results if r[0] == "ok"]
        lost = [r for r in results if r[0] != "ok"]
        assert ok and lost, [r[0] for r in results]  # both replicas had rows
        for kind, _, message in lost:
            assert kind in (503, "stream error") and "retry the request" in message, (kind, message)
        for _, _, (model, prompt, tokens) in ok:  # the survivor's rows are untouched
            assert tokens == decoder.greedy(prompt, model, TOKENS, ignore_eos=True)
        ended = max(t for _, t, _ in lost)
        print(f"\n{len(lost)} of 32 requests lost with the replica, all ended {ended:.2f} s after they were sent")

        retrying = openai.OpenAI(base_url=url, api_key="none", max_retries=3, timeout=120)
        t0 = time.monotonic()
        for prompt in decoder.prompts[:4]:  # served meanwhile (a 503 from the dead replica is retried)
            reply = retrying.completions.create(model=names[0], prompt=prompt, max_tokens=8, temperature=0)
            assert reply.usage.completion_tokens == 8
        print(f"4 new requests served in {time.monotonic() - t0:.2f} s after the kill")
        while time.monotonic() < killed + 120:
            now = _engines(server)
            if len(now) == 2 and before[0] not in now:
                break
            time.sleep(0.25)
        replaced = time.monotonic() - killed
        assert len(now) == 2 and before[0] not in now, f"no replacement replica within {replaced:.0f} s"
        print(f"replacement replica process up {replaced:.1f} s after the kill")
        reply = retrying.completions.create(model=names[1], prompt=decoder.prompts[5], max_tokens=TOKENS, temperature=0,
                                            extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
        assert list(reply.choices[0].model_extra["token_ids"]) == decoder.greedy(
            decoder.prompts[5], names[1], TOKENS, ignore_eos=True
        )
    finally:
        code, alive = server.stop()
    assert code == 130 and not alive
