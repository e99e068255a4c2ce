"""The OpenAI request layer without Ray or HTTP: strict types, OpenAI defaults, refused parameters by name,
hostile bodies answered 400, and `serve` without Ray installed (exit 3, one line)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lora_export.serving import protocol as p

BASE = {"model": "m", "prompt": "hi"}


def parsed(body: dict | bytes, cls=p.CompletionRequest):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = p.validate(cls, p.parse_json(raw))
    req.check_supported()
    return req


def refused(body, cls=p.CompletionRequest) -> p.ApiError:
    with pytest.raises(p.ApiError) as e:
        parsed(body, cls)
    assert e.value.status == 400 and e.value.message and "\n" not in e.value.message
    return e.value


def test_openai_defaults():
    req = parsed(BASE)
    s = req.sampling(req.limit())
    assert (s.max_tokens, s.temperature, s.top_p) == (16, 1.0, 1.0)
    assert parsed({**BASE, "max_tokens": None}).limit() == 16  # null is OpenAI's 16, not the context
    assert parsed({**BASE, "temperature": 0}).sampling(16).temperature == 0.0  # an int is a number


@pytest.mark.parametrize("t", [5e-324, 1e-9, 9e-6])
def test_temperatures_near_zero_are_greedy(t):
    assert parsed({**BASE, "temperature": t}).sampling(16).temperature == 0.0
    assert parsed({**BASE, "temperature": 2e-5}).sampling(16).temperature == 2e-5


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": "8"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": "0.5"}, "temperature"),
        ({"seed": -1}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"min_p": 0.05}, "min_p"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"n": 2}, "n"),
        ({"echo": True}, "echo"),
    ],
)
def test_bad_or_unsupported_parameters_are_named(extra, param):
    assert refused({**BASE, **extra}).param == param


def test_unknown_fields_are_all_named():
    e = refused({**BASE, "foo": 1, "bar": 2})
    assert "'foo'" in e.message and "'bar'" in e.message


@pytest.mark.parametrize("field", ["tools", "tool_choice", "functions", "function_call"])
def test_chat_tools_are_refused(field):
    value = [{"type": "function"}] if field in ("tools", "functions") else "auto"
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value}
    assert refused(body, p.ChatCompletionRequest).param == field


def test_hostile_bodies():
    assert refused(b'{"model": "m", "prompt": "abc\\ud800def"}').param == "prompt"  # a lone surrogate
    e = refused(b'{"model": "m", "messages": [{"role": "user", "content": "\\udfff"}]}', p.ChatCompletionRequest)
    assert e.param == "messages"
    assert "nested too deeply" in refused(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}").message
    deep = {"model": "m", "prompt": "x", "stream_options": json.loads("[" * 40 + "]" * 40)}  # under json's limit
    assert "nested too deeply" in refused(deep).message
    assert refused(b'{"model": "m", "prompt": "x", "temperature": NaN}').param == "temperature"


def test_internal_errors_say_nothing_of_the_server():
    from lora_export.serving.openai_api import internal_error

    e = internal_error(RuntimeError("boom at /work/secret.py line 3, pid 1234"))
    assert e.status == 500 and "request id" in e.message
    assert "/work" not in e.message and "1234" not in e.message and "boom" not in e.message


def test_serve_without_ray_exits_3_with_one_line(serve_decoder):
    code = (
        "import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
        "from lora_export.cli import main\n"
        f"sys.argv = ['lora-export', 'serve', {str(serve_decoder.folder)!r}]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "lora-export[serve]" in lines[0], proc.stderr


def test_adapter_dir_registers_without_loading_and_refuses_a_broken_entry(serve_decoder, tmp_path):
    from lora_export.errors import UserError
    from lora_export.serving import ServeConfig

    root = tmp_path / "adapters"
    for name in ("alpha", "beta"):
        (root / name).mkdir(parents=True)
        (root / name / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["c_attn"]}))
        (root / name / "adapter_model.safetensors").write_bytes(b"")  # read when first used, not at start
    (root / "notes").mkdir()  # not an adapter: ignored
    config = ServeConfig(str(serve_decoder.folder), adapter_dirs=[str(root)], folder_adapters=False)
    config.check()
    assert set(config.served_adapters()) == {"alpha", "beta"}
    assert config.checked_at_start() == {}  # registered only: nothing is loaded at start-up
    (root / "gamma").mkdir()
    (root / "gamma" / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match="gamma/adapter_config.json is not readable JSON"):
        ServeConfig(str(serve_decoder.folder), adapter_dirs=[str(root)]).served_adapters()


def test_runtime_loads_stay_inside_the_adapter_root(tmp_path):
    """`--adapter-root`: a lora_path outside it is a 403 that reads the same whether or not the path exists;
    inside it (relative or absolute) the resolved path reaches the backend."""
    from fastapi.testclient import TestClient

    from lora_export.serving.openai_api import build_http_app

    root = tmp_path / "root"
    (root / "good").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    loaded = []

    class Backend:
        async def load_adapter(self, name, path):
            loaded.append((name, path))

    client = TestClient(build_http_app(Backend(), runtime_adapters=True, adapter_root=str(root)))
    refused = []
    for path in [str(tmp_path / "outside"), str(tmp_path / "nowhere"), "../outside", str(root / ".." / "outside")]:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert r.status_code == 403, (path, r.text)
        refused.append(r.json()["error"]["message"])
    assert len(set(refused)) == 1 and "adapter root" in refused[0] and str(tmp_path) not in refused[0]
    for path in ["good", str(root / "good")]:
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path}).status_code == 200
    assert loaded == [("x", str(root / "good"))] * 2 and not any("outside" in p for _, p in loaded)


def test_proxy_routes_need_the_key_and_the_rest_passes_through(monkeypatch):
    """The middleware Ray Serve's proxy is wrapped in (`proxy_auth.middlewares`, named by Ray's callback
    variable): `/-/...` without the key is OpenAI's 401; with it, and any other path, reaches the app."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from lora_export.serving import proxy_auth

    monkeypatch.delenv(proxy_auth.KEY_ENV, raising=False)
    assert proxy_auth.middlewares() == [] and proxy_auth.environment(None) == {}
    env = proxy_auth.environment("k3y")
    assert env[proxy_auth.CALLBACK_ENV] == "lora_export.serving.proxy_auth:middlewares"
    monkeypatch.setenv(proxy_auth.KEY_ENV, env[proxy_auth.KEY_ENV])
    (middleware,) = proxy_auth.middlewares()

    async def ok(_request):
        return PlainTextResponse("reached")

    routes = [Route(path, ok) for path in ("/-/routes", "/-/healthz", "/health")]
    client = TestClient(Starlette(routes=routes, middleware=[middleware]))
    for path in ("/-/routes", "/-/healthz"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k3y"}):
            r = client.get(path, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers, r.text)
        assert client.get(path, headers={"Authorization": "Bearer k3y"}).text == "reached"
    assert client.get("/health").text == "reached"  # our app's routes: its own check
