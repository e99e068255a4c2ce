"""Faults, for real: `lora-export serve --replicas 2`, one engine replica lost while 32 requests are in flight,
its process killed (SIGKILL) or, on a two-node cluster made on this machine, its node removed. Its requests end
at once with a retryable OpenAI 503 (a stream with a 503 error event), none hangs; the survivor's rows finish with
the offline generator's tokens; new requests are served meanwhile (the official client retries a 503 by itself);
a replacement replica comes up (Serve's restart; on a node that joins again). Times are printed (-s)."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import tempfile
import time

import openai
import pytest
from serve_helpers import ServerProcess, free_port

pytest.importorskip("ray")

TOKENS = 40
STEP_MS = 50  # serve --debug-step-delay-ms: every row is still running when the replica is killed


def _engines(server) -> list[int]:
    return _replicas(server.proc.pid, "engine")


def _replicas(root: int, deployment: str) -> list[int]:
    """Pids of the Serve replica processes of `deployment` under process `root` (a server, a node's raylet)."""
    import psutil

    out = []
    for p in psutil.Process(root).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if "ServeReplica" in cmd and deployment in cmd:
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return sorted(out)


def _request(client, decoder, names: list[str], i: int):
    """Request i of a burst (adapters in turn, every 8th streamed): ("ok", end, (model, prompt, tokens)), or
    (status or "stream error", end, message); `end` is when it ended (time.monotonic())."""
    model, prompt = names[i % 2], decoder.prompts[i % len(decoder.prompts)]
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
            return "ok", time.monotonic(), (model, prompt, tokens)
        reply = client.completions.create(
            model=model, prompt=prompt, max_tokens=TOKENS, temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )  # fmt: skip
        return "ok", time.monotonic(), (model, prompt, list(reply.choices[0].model_extra["token_ids"]))
    except openai.APIStatusError as e:
        return e.status_code, time.monotonic(), str(e)
    except openai.APIError as e:  # an error event inside a stream
        return "stream error", time.monotonic(), str(e)


def _check_burst(results, decoder) -> tuple[list, list]:
    """Both replicas had rows; the lost ones got a retryable 503; the survivor's equal the offline tokens."""
    ok = [r for r in results if r[0] == "ok"]
    lost = [r for r in results if r[0] != "ok"]
    assert ok and lost, [r[0] for r in results]
    for kind, _, message in lost:
        assert kind in (503, "stream error") and "retry the request" in message, (kind, message)
    for _, _, (model, prompt, tokens) in ok:  # the survivor's rows are untouched
        assert tokens == decoder.greedy(prompt, model, TOKENS, ignore_eos=True)
    return ok, lost


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

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(_request, client, decoder, names, i) for i in range(32)]
            time.sleep(1.5)  # every request accepted and generating (40 steps of >= 50 ms)
            os.kill(before[0], signal.SIGKILL)
            killed = time.monotonic()
            results = [f.result(timeout=90) for f in futures]  # none hangs
        _, lost = _check_burst(results, decoder)
        ended = max(t for _, t, _ in lost) - killed
        assert ended < 30, f"lost requests ended {ended:.1f} s after the kill"
        print(f"\n{len(lost)} of 32 requests lost with the replica, all ended {ended:.2f} s after the kill")

        retrying = openai.OpenAI(base_url=url, api_key="none", max_retries=3, timeout=120)
        t0 = time.monotonic()
        for prompt in decoder.prompts[:4]:  # served meanwhile (a 503 from the dead replica is retried)
            reply = retrying.completions.create(model=names[0], prompt=prompt, max_tokens=8, temperature=0)
            assert reply.usage.completion_tokens == 8
        print(f"4 new requests served in {time.monotonic() - t0:.2f} s, from {t0 - killed:.1f} s after the kill")
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


def test_a_removed_node_costs_retryable_503s_and_the_survivor_serves(serve_decoder, tmp_path, monkeypatch):
    """Two Ray nodes on this machine (`ray.cluster_utils.Cluster`): the head holds the proxy, the ingress and
    one engine replica; a worker node holds the other. Removing the worker node (its raylet and workers
    killed) while 32 requests are in flight: its requests end with a retryable 503 within a bound, the head's
    finish with the offline tokens, new requests are served; a node that joins again gets a new replica."""
    from ray.cluster_utils import Cluster

    decoder = serve_decoder
    port = free_port()
    temp = tempfile.mkdtemp(prefix="lora_ray_")  # short: Ray's socket paths must fit 107 bytes
    os.mkdir(os.path.join(temp, "ray"))
    monkeypatch.setenv("RAY_TMPDIR", temp)  # Ray's address file too (else /tmp/ray/ray_current_cluster)
    cluster = Cluster(shutdown_at_exit=False)
    server = None
    try:
        cluster.add_node(num_cpus=1, include_dashboard=False, temp_dir=temp)  # the head
        head = _raylet(cluster.head_node)
        args = [str(decoder.folder), "--address", cluster.address, "--port", str(port), "--proxy-location", "HeadOnly"]
        args += ["--replicas", "2", "--max-replicas-per-node", "1", "--max-batch-size", "16", "--threads", "1"]
        args += ["--debug-step-delay-ms", str(STEP_MS)]
        server = ServerProcess(args, tmp_path, startup_timeout=None)
        _wait(lambda: _replicas(head, "ingress") and _replicas(head, "engine"), 240, "ingress + engine on the head")
        worker = cluster.add_node(num_cpus=1, temp_dir=temp)  # only now: the ingress stays on the head
        server.wait_ready(240)
        _wait(lambda: _replicas(_raylet(worker), "engine"), 120, "an engine replica on the worker node")

        url = f"http://127.0.0.1:{port}/v1"
        names = decoder.adapter_names[:2]
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(_request, client, decoder, names, i) for i in range(32)]
            time.sleep(1.5)  # every request accepted and generating (40 steps of >= 50 ms)
            removed = time.monotonic()
            cluster.remove_node(worker, allow_graceful=False)
            results = [f.result(timeout=90) for f in futures]  # none hangs
        _, lost = _check_burst(results, decoder)
        ended = max(t for _, t, _ in lost) - removed
        assert ended < 60, f"lost requests ended {ended:.1f} s after the node was removed"
        print(f"\nnode removed: {len(lost)} of 32 requests lost, all ended {ended:.2f} s after the removal")

        retrying = openai.OpenAI(base_url=url, api_key="none", max_retries=3, timeout=120)
        t0 = time.monotonic()
        for prompt in decoder.prompts[:4]:  # the head's replica serves meanwhile
            reply = retrying.completions.create(model=names[0], prompt=prompt, max_tokens=8, temperature=0)
            assert reply.usage.completion_tokens == 8
        print(f"4 new requests served in {time.monotonic() - t0:.2f} s, from {t0 - removed:.1f} s after the removal")

        joined = time.monotonic()
        again = cluster.add_node(num_cpus=1, temp_dir=temp)
        _wait(lambda: _replicas(_raylet(again), "engine"), 180, "a replacement replica on the new node")
        print(f"a new node joined: its replacement replica was up {time.monotonic() - joined:.1f} s later")
    finally:
        if server is not None:
            code, alive = server.stop()
        cluster.shutdown()
        left = _processes_mentioning(temp)
        for pid in left:  # leave nothing running, even when the test is about to fail
            os.kill(pid, signal.SIGKILL)
        _remove_tree(temp)
    assert code == 130 and not alive
    assert not left, f"cluster processes left running after its shutdown: {left}"


def _raylet(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def _wait(ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.5)


def _processes_mentioning(text: str) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(text in part for part in p.info["cmdline"] or []):
            out.append(p.info["pid"])
    return out


def _remove_tree(folder: str) -> None:
    for _ in range(10):  # the node processes may still be closing their log files
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.exists(folder):
            return
        time.sleep(0.2)
