"""The OpenAI wire format: request validation into internal requests, replies, stream chunks, error bodies.

Plain pydantic and dicts (no FastAPI, no Ray), shaped as OpenAI's API and vLLM's OpenAI-compatible server:

- `POST /v1/completions`: `model`, `prompt` (text, token ids, or a list of either), `max_tokens` (16),
  `temperature` (1), `top_p`, `seed`, `stop`, `stream`, `stream_options.include_usage`; vLLM's extensions
  `top_k`, `ignore_eos`, `stop_token_ids`, `return_token_ids` (token ids in each choice / chunk);
- `POST /v1/chat/completions`: `messages` (text content), `max_tokens` / `max_completion_tokens`, the same
  sampling fields;
- errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status (400 bad request,
  401 missing/wrong key, 404 unknown model or adapter, 500 our bug, 503 not ready);
- vLLM's runtime adapter endpoints: `{"lora_name", "lora_path"}` and `{"lora_name"}`.

Parameters OpenAI defines that this server does not implement (`n` > 1, `best_of`, `echo`, `logprobs`,
`suffix`, `logit_bias`, penalties, tools) are refused with a 400 naming the parameter, never ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lora_export.serving.scheduler import SamplingParams

# -- errors --------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error reply: HTTP status + OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    @classmethod
    def from_body(cls, status: int, body: dict[str, Any]) -> ApiError:
        e = body.get("error", {})
        return cls(status, e.get("message", ""), param=e.get("param"), code=e.get("code"))


def model_not_found(name: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{name}` does not exist: GET /v1/models lists the base model and the loaded adapters.",
        param="model",
        code="model_not_found",
    )


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"The request body is not valid JSON ({e}): send a JSON object.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def validate(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"Invalid value for '{where}': {first['msg']}.", param=where or None) from None


# -- requests ------------------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # vLLM: -1 or 0 = off
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    return_token_ids: bool = False
    best_of: int | None = None
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    user: str | None = None

    def check_supported(self) -> None:
        refused = {
            "n": self.n != 1,
            "best_of": self.best_of not in (None, 1),
            "logprobs": self.logprobs not in (None, False, 0),
            "logit_bias": bool(self.logit_bias),
            "presence_penalty": bool(self.presence_penalty),
            "frequency_penalty": bool(self.frequency_penalty),
        }
        for name, bad in refused.items():
            if bad:
                raise ApiError(400, f"'{name}' is not supported by this server: leave it at its default.", param=name)
        stops = self.stops()
        if any(not s for s in stops):
            raise ApiError(400, "'stop' strings must not be empty.", param="stop")

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else 0,  # 0: the engine fills in "up to the context"
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            seed=self.seed,
            stop=self.stops(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise ApiError(400, "'echo' is not supported by this server.", param="echo")
        if self.suffix:
            raise ApiError(400, "'suffix' is not supported by this server.", param="suffix")
        _check_max_tokens(self.max_tokens, "max_tokens")

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ApiError(400, "'prompt' is empty.", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return [x if isinstance(x, str) else list(x) for x in p]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ApiError(
                    400, f"Only text content is supported, got a '{part.get('type')}' part.", param="messages"
                )
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise ApiError(400, "'tools' is not supported by this server.", param="tools")
        _check_max_tokens(self.max_tokens, "max_tokens")
        _check_max_tokens(self.max_completion_tokens, "max_completion_tokens")

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)


def _check_max_tokens(value: int | None, name: str) -> None:
    if value is not None and value < 1:
        raise ApiError(400, f"'{name}' must be at least 1, got {value}.", param=name)


# -- the internal request (ingress -> engine) ----------------------------------------------------------------


@dataclass(frozen=True)
class AdapterRef:
    """An adapter as the ingress's table knows it: the version changes on every (re)load of the name."""

    name: str
    path: str
    version: int

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class LiveTable:
    """The ingress's adapter table as replicas see it: name -> version, and a revision that grows with every
    load/unload (a replica ignores a table older than one it has seen: requests can arrive out of order)."""

    revision: int
    versions: dict[str, int]

    def lists(self, key: str) -> bool:
        """Whether `name@version` is current."""
        name, _, version = key.rpartition("@")
        return self.versions.get(name) == int(version)


@dataclass
class EngineRequest:
    prompt: str | list[int] | None  # text or token ids (completions)
    messages: list[dict[str, str]] | None  # chat
    adapter: AdapterRef | None
    params: SamplingParams
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


# -- replies -------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_reply(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": use,
    }


def completion_choice(index: int, text: str, finish: str | None, token_ids: list[int] | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def chat_reply(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": use,
    }


def chat_choice(index: int, text: str, finish: str | None, token_ids: list[int] | None) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": finish,
    }
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def chunk(rid: str, model: str, chat: bool, choices: list[dict[str, Any]], use: dict | None = None) -> dict:
    out = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if use is not None:
        out["usage"] = use
    return out


def chunk_choice(
    index: int, chat: bool, text: str, finish: str | None, token_ids: list[int] | None, *, role: bool = False
) -> dict[str, Any]:
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {"content": text}
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event; the stream ends with `sse("[DONE]")`."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def model_card(name: str, *, root: str, parent: str | None, max_model_len: int | None) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "lora-export",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
    }


def finish_reason(reason: str) -> str:
    """Scheduler reasons -> OpenAI's ("stop" | "length")."""
    return "length" if reason == "length" else "stop"
