"""The OpenAI-compatible HTTP app (FastAPI) over a `Backend`; no Ray here.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, `POST /v1/load_lora_adapter`,
`POST /v1/unload_lora_adapter`, `GET /stats` (scheduler counters per replica), `GET /health`. With an API
key, every route but `/health` needs `Authorization: Bearer KEY`. Bodies are parsed here (not by FastAPI) so
that malformed JSON and bad parameters get OpenAI's error body with a 400, never FastAPI's 422.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lora_export.serving import protocol as p
from lora_export.serving.protocol import ApiError, EngineRequest

log = logging.getLogger("lora_export.serving")


class Backend(Protocol):
    """What the HTTP layer needs from the serving side (the Ray ingress implements it).

    `stream` yields engine events: first `{"prompt_tokens": n}` once the request is accepted (an ApiError is
    raised instead when it is not), then `{"ids": [...], "text": "..."}` deltas, last `{"finish": reason,
    "prompt_tokens", "completion_tokens"[, "error"]}`. `complete` returns the whole result at once:
    `{"ids", "text", "finish", "prompt_tokens", "completion_tokens"[, "error"]}`."""

    def model_cards(self) -> list[dict[str, Any]]: ...

    def resolve(self, model: str) -> p.AdapterRef | None: ...

    async def complete(self, request: EngineRequest) -> dict[str, Any]: ...

    def stream(self, request: EngineRequest) -> AsyncIterator[dict[str, Any]]: ...

    async def load_adapter(self, name: str, path: str) -> None: ...

    async def unload_adapter(self, name: str) -> None: ...

    async def stats(self) -> dict[str, Any]: ...


DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to be over `limit` bytes (its Content-Length, or
    the bytes received so far): an oversized body is never read whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is over {limit} bytes: send a smaller request (serve --max-request-bytes).")


def key_error(header: str, api_key: str) -> ApiError | None:
    """None when the `Authorization` header carries `Bearer api_key` (compared in constant time); else the 401."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode()):
        return None
    what = "No API key provided" if not header else "Incorrect API key provided"
    return ApiError(401, f"{what}: send 'Authorization: Bearer KEY'.", code="invalid_api_key")


def inside_root(path: str, root: str | None) -> str:
    """`path` (relative ones under `root`) when `root` is None or it resolves inside `root`; else a 403 that says
    the same whether or not the path exists."""
    if root is None:
        return path
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, path))
    if os.path.commonpath([real, real_root]) != real_root:
        raise ApiError(
            403, "lora_path must be inside the server's adapter root (serve --adapter-root).", param="lora_path"
        )
    return real


def build_http_app(
    backend: Backend,
    *,
    api_key: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    runtime_adapters: bool = True,
    adapter_root: str | None = None,
) -> FastAPI:
    app = FastAPI(title="lora-export serve", docs_url=None, redoc_url=None, openapi_url=None)

    async def body_of(request: Request) -> dict[str, Any]:
        return p.parse_json(await read_body(request, max_request_bytes))

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, e: StarletteHTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _bug(_request: Request, e: Exception):
        return JSONResponse(internal_error(e).body(), status_code=500)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path != "/health":
            error = key_error(request.headers.get("authorization", ""), api_key)
            if error is not None:
                return JSONResponse(error.body(), status_code=error.status)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return PlainTextResponse("ok")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": backend.model_cards()}

    @app.get("/stats")
    async def stats():
        return await backend.stats()

    def check_runtime_adapters() -> None:
        if not runtime_adapters:
            raise ApiError(
                403, "Loading and unloading adapters at run time is off: start serve with --allow-runtime-adapters."
            )

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        check_runtime_adapters()
        body = p.validate(p.LoadLoRAAdapterRequest, await body_of(request))
        await backend.load_adapter(body.lora_name, inside_root(body.lora_path, adapter_root))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        check_runtime_adapters()
        body = p.validate(p.UnloadLoRAAdapterRequest, await body_of(request))
        await backend.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = p.validate(p.CompletionRequest, await body_of(request))
        body.check_supported()
        adapter = backend.resolve(body.model)
        reqs = [EngineRequest(x, None, adapter, body.sampling(body.limit())) for x in body.prompts()]
        return await _answer(body, reqs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = p.validate(p.ChatCompletionRequest, await body_of(request))
        body.check_supported()
        adapter = backend.resolve(body.model)
        reqs = [EngineRequest(None, body.conversation(), adapter, body.sampling(body.limit()))]
        return await _answer(body, reqs, chat=True)

    async def _answer(body: p._Request, reqs: list[EngineRequest], *, chat: bool):
        rid = p.new_id("chatcmpl" if chat else "cmpl")
        ids = body.return_token_ids
        if body.stream:
            streams = [backend.stream(r) for r in reqs]
            try:
                firsts = [await s.__anext__() for s in streams]  # accepted, or an ApiError -> its status
            except BaseException:
                await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
                raise
            events = _merge(streams)
            prompt_tokens = sum(f["prompt_tokens"] for f in firsts)
            gen = _sse(events, rid, body.model, chat, ids, prompt_tokens, body.include_usage(), len(reqs))
            return StreamingResponse(gen, media_type="text/event-stream")
        results = await asyncio.gather(*(backend.complete(r) for r in reqs))
        choices = []
        for i, res in enumerate(results):
            if res.get("error"):
                raise internal_error(RuntimeError(res["error"]))
            make = p.chat_choice if chat else p.completion_choice
            choices.append(make(i, res["text"], p.finish_reason(res["finish"]), res["ids"] if ids else None))
        use = p.usage(sum(r["prompt_tokens"] for r in results), sum(r["completion_tokens"] for r in results))
        return (p.chat_reply if chat else p.completion_reply)(rid, body.model, choices, use)

    return app


def internal_error(e: BaseException) -> ApiError:
    """A 500 that tells the client nothing of the server (no traceback, path, pid, address) but a request id
    to quote; the server logs one line with that id, the traceback at debug level."""
    rid = uuid.uuid4().hex[:12]
    detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    log.error("internal error %s: %s: %s", rid, type(e).__name__, detail)
    log.debug("internal error %s", rid, exc_info=e)
    return ApiError(500, f"Internal server error (request id {rid}): the server logged the details.")


async def _merge(streams: list[AsyncIterator[dict[str, Any]]]) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """Events of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[dict[str, Any]]) -> None:
        try:
            async for event in stream:
                await queue.put((i, event))
        except Exception as e:  # the engine went away mid-stream
            await queue.put((i, {"finish": "error", "error": str(e), "prompt_tokens": 0, "completion_tokens": 0}))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        done = 0
        while done < len(streams):
            i, event = await queue.get()
            done += "finish" in event
            yield i, event
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)


async def _sse(
    events: AsyncIterator[tuple[int, dict[str, Any]]],
    rid: str,
    model: str,
    chat: bool,
    with_ids: bool,
    prompt_tokens: int,
    include_usage: bool,
    n: int,
) -> AsyncIterator[bytes]:
    """OpenAI's chunk stream: (chat: a role chunk per choice,) text chunks, a finish chunk per choice, a usage
    chunk when asked, `data: [DONE]`. An engine failure mid-stream becomes an error event before [DONE]."""
    completion_tokens = 0
    try:
        if chat:
            for i in range(n):
                choice = p.chunk_choice(i, True, "", None, [] if with_ids else None, role=True)
                yield p.sse(p.chunk(rid, model, True, [choice]))
        async for i, event in events:
            if "finish" in event:
                if event.get("error") and event.get("status") == 503:  # the replica went away: retryable
                    yield p.sse(ApiError(503, event["error"], code="replica_unavailable").body())
                    continue
                if event.get("error"):
                    yield p.sse(internal_error(RuntimeError(event["error"])).body())
                    continue
                completion_tokens += event["completion_tokens"]
                choice = p.chunk_choice(i, chat, "", p.finish_reason(event["finish"]), [] if with_ids else None)
                yield p.sse(p.chunk(rid, model, chat, [choice]))
            elif "ids" in event:
                choice = p.chunk_choice(i, chat, event["text"], None, event["ids"] if with_ids else None)
                yield p.sse(p.chunk(rid, model, chat, [choice]))
        if include_usage:
            yield p.sse(p.chunk(rid, model, chat, [], p.usage(prompt_tokens, completion_tokens)))
        yield p.sse("[DONE]")
    finally:
        await events.aclose()
