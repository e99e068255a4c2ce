"""`ServeEngine`: one replica's worth of serving, without Ray.

It owns the decoder (a `ServedModel`: the batch API of the generator plus adapter loading), the folder's
tokenizer, and a `Scheduler` stepping in its own thread. Requests come in as `EngineRequest`s (text, token
ids or chat messages; an `AdapterRef`; sampling parameters) and go out as event dicts, first
`{"prompt_tokens": n}` (or `{"rejected": {"status", "body"}}`), then `{"ids", "text"}` deltas, last
`{"finish", "prompt_tokens", "completion_tokens", "replica", "stats"[, "error"]}`.

Adapters are resident under `name@version` keys: loaded on first use, counted while requests use them,
unloaded once the ingress's table no longer lists that version and no request holds it.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from lora_export.errors import UserError
from lora_export.runtime.generator import chat_ids, has_chat_template, max_token_chars
from lora_export.serving.protocol import AdapterRef, ApiError, EngineRequest, LiveTable
from lora_export.serving.scheduler import BatchModel, Delta, Finish, Request, Scheduler


class ServedModel(BatchModel, Protocol):
    layout: str  # "bank" (rows mix adapters), "inputs" (one adapter per batch) or "merged" (no adapters)
    context_length: int
    vocab_size: int
    eos_token_ids: Sequence[int]

    def load_adapter(self, name: str, path: str) -> None: ...

    def unload_adapter(self, name: str) -> None: ...


class ServeEngine:
    def __init__(
        self,
        model: ServedModel,
        tokenizer: Any = None,
        *,
        max_batch_size: int = 32,
        batch_wait_ms: float = 10.0,
        replica: str = "local",
        max_cpu_adapters: int | None = None,
        max_adapters_per_batch: int | None = None,
    ):
        self.model = model
        self.max_cpu_adapters = max_cpu_adapters  # resident adapters kept in memory (LRU); None: all
        self.tokenizer = tokenizer
        # a text prompt over context × this many characters is refused without being tokenized
        self._max_token_chars = max_token_chars(tokenizer) if tokenizer is not None else None
        self.replica = replica
        detok = None
        if tokenizer is not None:

            def detok(ids):
                return tokenizer.decode(list(ids), skip_special_tokens=True)

        self.scheduler = Scheduler(
            model,
            max_batch_size=max_batch_size,
            batch_wait_ms=batch_wait_ms,
            eos_token_ids=model.eos_token_ids,
            context_length=model.context_length,
            mix_adapters=model.layout == "bank",
            max_adapters_per_batch=max_adapters_per_batch,
            detokenize=detok,
        )
        self._resident: set[str] = set()
        self._recent: OrderedDict[str, None] = OrderedDict()  # resident keys, least recently used first
        self.evictions = 0
        self._in_use: Counter[str] = Counter()
        self._live: LiveTable | None = None
        self._deferred: set[str] = set()
        self.deferred_unloads = 0  # unloaded (or replaced) while requests were still using them
        self._lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}
        self.scheduler.start()

    def close(self) -> None:
        self.scheduler.stop()

    # -- adapters -----------------------------------------------------------------------------------------
    def ensure_adapter(self, ref: AdapterRef) -> None:
        """Make `ref` resident (blocking: call it off the event loop). A bad file is a 400."""
        if self.model.layout == "merged":
            raise ApiError(
                400,
                "This server's model folder is merged (one adapter folded in): it serves only the base model; "
                "export with --layout bank or inputs to serve adapters.",
                param="model",
            )
        with self._lock:
            if ref.key in self._resident:
                return
            lock = self._load_locks.setdefault(ref.key, threading.Lock())
        with lock:
            if ref.key in self._resident:
                return
            try:
                self.model.load_adapter(ref.key, ref.path)
            except UserError as e:
                raise ApiError(
                    400, f"Cannot load adapter '{ref.name}' from {ref.path}: {e}", param="lora_path"
                ) from None
            with self._lock:
                self._resident.add(ref.key)
                self._recent[ref.key] = None
                self._load_locks.pop(ref.key, None)
            self._evict(keep=ref.key)

    def _evict(self, keep: str) -> None:
        """Unload least recently used adapters that no request holds, down to `max_cpu_adapters` (an adapter in
        use is never unloaded: the cache may run over while every resident adapter is busy)."""
        if self.max_cpu_adapters is None:
            return
        with self._lock:
            over = len(self._resident) - self.max_cpu_adapters
            idle = [k for k in self._recent if k != keep and not self._in_use[k] and k in self._resident]
            gone = idle[: max(0, over)]
            for k in gone:
                self._resident.discard(k)
                self._recent.pop(k, None)
            self.evictions += len(gone)
        for k in gone:
            self.model.unload_adapter(k)

    def sync(self, live: LiveTable | None) -> None:
        """The ingress's current table: drop resident versions it no longer lists (once no request holds them)."""
        with self._lock:
            if live is None or (self._live is not None and live.revision <= self._live.revision):
                return
            self._live = live
            stale = [k for k in self._resident if not self._is_live(k) and not self._in_use[k]]
            held = {k for k in self._resident if not self._is_live(k) and self._in_use[k]}
            self.deferred_unloads += len(held - self._deferred)  # dropped when their last request ends
            self._deferred |= held
            self._resident.difference_update(stale)
            for k in stale:
                self._recent.pop(k, None)
        for key in stale:
            self.model.unload_adapter(key)

    def _is_live(self, key: str) -> bool:
        return self._live is None or self._live.lists(key)

    def _hold(self, key: str | None) -> None:
        if key is not None:
            with self._lock:
                self._in_use[key] += 1
                if key in self._recent:
                    self._recent.move_to_end(key)

    def _release(self, key: str | None) -> None:
        if key is None:
            return
        with self._lock:
            self._in_use[key] -= 1
            drop = not self._in_use[key] and not self._is_live(key) and key in self._resident
            if not self._in_use[key]:
                del self._in_use[key]
            if drop:
                self._resident.discard(key)
                self._recent.pop(key, None)
                self._deferred.discard(key)
        if drop:
            self.model.unload_adapter(key)

    def resident(self) -> list[str]:
        with self._lock:
            return sorted(self._resident)

    # -- requests -----------------------------------------------------------------------------------------
    def prepare(self, req: EngineRequest) -> Request:
        """Token ids, limits and stops checked: a scheduler request, or an ApiError (400)."""
        ids = self._prompt_ids(req)
        context = self.model.context_length
        if len(ids) >= context:
            raise ApiError(
                400,
                f"This model's maximum context length is {context} tokens, but the prompt has {len(ids)}: "
                "shorten the prompt.",
                param="messages" if req.messages is not None else "prompt",
                code="context_length_exceeded",
            )
        params = req.params
        if params.max_tokens == 0:  # not given (chat): up to the context
            params = replace(params, max_tokens=context - len(ids))
        elif len(ids) + params.max_tokens > context:
            raise ApiError(
                400,
                f"This model's maximum context length is {context} tokens; you requested "
                f"{len(ids) + params.max_tokens} ({len(ids)} in the prompt, {params.max_tokens} for the completion): "
                "lower max_tokens or shorten the prompt.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if params.stop and self.tokenizer is None:
            raise ApiError(
                400, "Stop strings need a tokenizer and this model folder has none: use stop_token_ids.", param="stop"
            )
        bad = [t for t in params.stop_token_ids if not 0 <= t < self.model.vocab_size]
        if bad:
            raise ApiError(
                400,
                f"stop_token_ids {bad[:5]} are outside the vocabulary (0..{self.model.vocab_size - 1}).",
                param="stop_token_ids",
            )
        adapter = req.adapter.key if req.adapter is not None else None
        return Request(ids, adapter, params, req.id)

    def _prompt_ids(self, req: EngineRequest) -> list[int]:
        tok = self.tokenizer
        if req.messages is not None:
            if tok is None or not has_chat_template(tok):
                raise ApiError(
                    400, "This model folder's tokenizer has no chat template: use /v1/completions.", param="messages"
                )
            self._refuse_text_over_context(sum(len(m["content"]) for m in req.messages), "messages")
            return chat_ids(tok, req.messages)
        if isinstance(req.prompt, str):
            if tok is None:
                raise ApiError(400, "This model folder has no tokenizer: send the prompt as token ids.", param="prompt")
            self._refuse_text_over_context(len(req.prompt), "prompt")
            ids = tok(req.prompt)["input_ids"]
            if not ids:
                raise ApiError(400, "The prompt is empty.", param="prompt")
            return [int(i) for i in ids]
        ids = [int(i) for i in req.prompt or []]
        if not ids:
            raise ApiError(400, "The prompt is empty.", param="prompt")
        bad = [i for i in ids if not 0 <= i < self.model.vocab_size]
        if bad:
            raise ApiError(
                400,
                f"Prompt token ids {bad[:5]} are outside the vocabulary (0..{self.model.vocab_size - 1}).",
                param="prompt",
            )
        return ids

    def _refuse_text_over_context(self, chars: int, param: str) -> None:
        """A text that cannot fit the context whatever it holds is refused before the tokenizer spends seconds
        on it (a 5 MB prompt: about 5 s of a core); see `max_token_chars`."""
        per, context = self._max_token_chars, self.model.context_length
        if per is not None and chars > context * per:
            raise ApiError(
                400,
                f"This model's maximum context length is {context} tokens, but the prompt's {chars} characters are "
                f"at least {-(-chars // per)} tokens: shorten the prompt.",
                param=param,
                code="context_length_exceeded",
            )

    async def stream(self, req: EngineRequest, live: LiveTable | None = None) -> AsyncIterator[dict[str, Any]]:
        self.sync(live)
        loop = asyncio.get_running_loop()
        key = req.adapter.key if req.adapter is not None else None
        self._hold(key)  # before loading it: a sync in between must not drop it
        held = True
        sreq = None
        finished = False
        try:
            try:  # tokenizing a long prompt off the event loop: other requests on this replica go on meanwhile
                sreq = await loop.run_in_executor(None, self.prepare, req)
                if req.adapter is not None:
                    await loop.run_in_executor(None, self.ensure_adapter, req.adapter)
            except ApiError as e:
                yield {"rejected": {"status": e.status, "body": e.body()}}
                return
            queue: asyncio.Queue = asyncio.Queue()
            self.scheduler.submit(sreq, on_event=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
            yield {"prompt_tokens": len(sreq.prompt_ids)}
            while not finished:
                events = [await queue.get()]
                while not queue.empty():  # several steps' tokens at once when the reader fell behind
                    events.append(queue.get_nowait())
                ids, text = [], []
                for ev in events:
                    if isinstance(ev, Delta):
                        ids += ev.token_ids
                        text.append(ev.text)
                if ids:
                    yield {"ids": ids, "text": "".join(text)}
                for ev in events:
                    if isinstance(ev, Finish):
                        finished, held = True, False
                        self._release(key)  # before the reply leaves: the client may act on it at once
                        yield self._finish_event(ev)
        finally:
            if sreq is not None and not finished:
                self.scheduler.cancel(sreq.id)
            if held:
                self._release(key)

    async def complete(self, req: EngineRequest, live: LiveTable | None = None) -> dict[str, Any]:
        ids: list[int] = []
        text: list[str] = []
        async for event in self.stream(req, live):
            if "rejected" in event:
                return event
            if "ids" in event:
                ids += event["ids"]
                text.append(event["text"])
            if "finish" in event:
                return {**event, "ids": ids, "text": "".join(text)}
        raise RuntimeError("the request stream ended without a finish event")

    def _finish_event(self, ev: Finish) -> dict[str, Any]:
        out = {
            "finish": ev.reason,
            "prompt_tokens": ev.prompt_tokens,
            "completion_tokens": ev.completion_tokens,
            "replica": self.replica,
            "stats": self.stats(),
        }
        if ev.error:
            out["error"] = ev.error
        return out

    def stats(self) -> dict[str, Any]:
        return {
            **self.scheduler.stats.to_dict(),
            "layout": self.model.layout,
            "adapters_resident": self.resident(),
            "adapter_evictions": self.evictions,
            "deferred_unloads": self.deferred_unloads,
            "rss_bytes": _rss_bytes(),
            "open_fds": _open_fds(),
        }


def _open_fds() -> int | None:
    """This process's open file descriptors (Linux `/proc`; None elsewhere): a leak shows as growth."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def _rss_bytes() -> int | None:
    """This process's resident memory (Linux `/proc`; None elsewhere): what the adapter cache bounds."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
