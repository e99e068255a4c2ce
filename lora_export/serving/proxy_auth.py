"""The API key on Ray Serve's own HTTP routes (`/-/routes`, `/-/healthz`), which its proxy answers itself,
before any request reaches our app.

Ray Serve wraps its proxy's whole ASGI app in the Starlette middlewares that the function named by the
environment variable `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` returns; the proxy actor calls it when it
starts. `launch.serve` sets that variable (and this module's key variable) before it starts a local Ray
instance, whose processes inherit them. On a cluster joined with `--address`, the proxy was started with the
cluster's environment: set both on every `ray start` to the same effect.
"""

from __future__ import annotations

import json
import os

from lora_export.serving.openai_api import key_error

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "lora_export.serving.proxy_auth:middlewares"
KEY_ENV = "LORA_EXPORT_PROXY_API_KEY"
PREFIX = "/-/"  # the proxy's own routes


class ProxyRoutesAuth:
    """Pure ASGI middleware: an HTTP request under `/-/` without `Authorization: Bearer KEY` gets OpenAI's 401
    body; everything else passes through untouched (our app checks its own routes)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path", "")[len(scope.get("root_path", "")) :].startswith(PREFIX):
            header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"), "")
            error = key_error(header, self.api_key)
            if error is not None:
                body = json.dumps(error.body()).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": error.status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def middlewares() -> list:
    """Ray Serve's proxy callback: the key check when `LORA_EXPORT_PROXY_API_KEY` is set, else nothing."""
    from starlette.middleware import Middleware

    key = os.environ.get(KEY_ENV)
    return [Middleware(ProxyRoutesAuth, api_key=key)] if key else []


def environment(api_key: str | None) -> dict[str, str]:
    """The variables to set before a local Ray instance starts so that its proxy checks `api_key`."""
    return {CALLBACK_ENV: CALLBACK, KEY_ENV: api_key} if api_key else {}
