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

Parameters OpenAI (or vLLM) defines that this server does not implement (`n` > 1, `best_of`, `echo`,
`logprobs`, `top_logprobs`, `suffix`, `logit_bias`, penalties, `repetition_penalty`, `min_p`, tools and
functions, `response_format`) are refused with a 400 naming the parameter, never ignored; so is any field
OpenAI does not define. Types are OpenAI's, strictly: `"8"` or `true` is not a number. A temperature below
`GREEDY_BELOW` is greedy (as vLLM).
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


MAX_DEPTH = 32  # JSON nesting a request may have (OpenAI's own bodies need 5)
GREEDY_BELOW = 1e-5  # temperatures below this are greedy: sampling at them only overflows


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"The request body is not valid JSON ({e}): send a JSON object.") from None
    except RecursionError:
        raise ApiError(400, f"The request body is nested too deeply (at most {MAX_DEPTH} levels).") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    _check_values(body)
    return body


def _check_values(body: dict[str, Any]) -> None:
    """Nesting depth, and text that is not valid Unicode (a lone surrogate such as "\\ud800"), named by field."""
    todo: list[tuple[Any, str, int]] = [(body, "", 0)]
    while todo:
        value, where, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise ApiError(400, f"The request body is nested too deeply (at most {MAX_DEPTH} levels).")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                field = where.split(".")[0].split("[")[0] or None
                raise ApiError(400, f"'{where}' is not valid Unicode text (a lone surrogate).", param=field) from None
        elif isinstance(value, dict):
            todo += [(v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in value.items()]
        elif isinstance(value, list):
            todo += [(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]


def validate(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        errors = e.errors()
        unknown = [".".join(str(p) for p in x["loc"]) for x in errors if x["type"] == "extra_forbidden"]
        if unknown:
            names = ", ".join(f"'{u}'" for u in unknown)
            raise ApiError(
                400, f"Unrecognized request argument{'s' * (len(unknown) > 1)} supplied: {names}.", param=unknown[0]
            ) from None
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"])
        top = str(first["loc"][0]) if first["loc"] else None
        raise ApiError(400, f"Invalid value for '{where}': {first['msg']}.", param=top) from None


# -- requests ------------------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    temperature: float | None = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1)  # vLLM: -1 or 0 = off
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
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
    top_logprobs: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None  # vLLM's
    min_p: float | None = None  # vLLM's
    response_format: Any = None
    user: str | None = None

    def check_supported(self) -> None:
        refused = {
            "n": self.n != 1,
            "best_of": self.best_of not in (None, 1),
            "logprobs": self.logprobs not in (None, False, 0),
            "top_logprobs": self.top_logprobs not in (None, 0),
            "logit_bias": bool(self.logit_bias),
            "presence_penalty": bool(self.presence_penalty),
            "frequency_penalty": bool(self.frequency_penalty),
            "repetition_penalty": self.repetition_penalty not in (None, 1.0),
            "min_p": bool(self.min_p),
            "response_format": self.response_format not in (None, {"type": "text"}),
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
        temperature = 1.0 if self.temperature is None else self.temperature
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else 0,  # 0: the engine fills in "up to the context"
            temperature=0.0 if temperature < GREEDY_BELOW else temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k, 0),
            seed=self.seed,
            stop=self.stops(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # null: OpenAI's 16 as well
    echo: bool = False
    suffix: str | None = None

    def limit(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens

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
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None

    def check_supported(self) -> None:
        super().check_supported()
        for name in ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call"):
            if getattr(self, name) not in (None, [], "none"):
                raise ApiError(400, f"'{name}' is not supported by this server.", param=name)
        _check_max_tokens(self.max_tokens, "max_tokens")
        _check_max_tokens(self.max_completion_tokens, "max_completion_tokens")

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

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
