"""The serving scheduler: plain Python, no Ray, no HTTP.

It takes requests (prompt ids, an adapter, sampling parameters) and turns them into per-request token
streams, driving a `BatchModel` one step at a time:

- **batch forming**: when nothing is running, the first waiting request opens a wait window of
  `batch_wait_ms`; every request that arrives inside it (up to `max_batch_size`) is prefilled into the
  same batch, one row per request, each row with its own adapter (a bank graph mixes them in one forward);
- **continuous batching**: while a batch runs, waiting requests join it at the next decode-step boundary
  (prefilled together, then appended to the running rows) as long as there is room; a row leaves as soon as
  it stops, so its slot is free for the next request;
- **per-row stop**: eos (unless `ignore_eos`), stop token ids, stop strings (text from `detokenize`,
  the stop string itself not returned), `max_tokens`, the context length, or a cancel;
- without per-row adapters (`mix_adapters=False`: merged or `inputs` graphs) a batch holds one adapter;
  requests for another wait until the batch drains, then the oldest waiting request picks the next one.

One thread calls `step()` (or `start()` runs that loop in a daemon thread); `submit` and `cancel` may be
called from any thread. `stats` counts what the scheduler did, so tests and benchmarks can assert on it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from lora_export.serving.detok import IncrementalText

log = logging.getLogger("lora_export.serving")


class BatchModel(Protocol):
    """What the scheduler drives: a decoder that keeps a batch of rows with their KV caches.

    `prefill` starts new rows (own prompt, own adapter) and returns their state and next-token logits
    `(rows, vocab)`; `extend` appends prefilled rows to a running state (a step boundary); `step` feeds one
    token per row and returns the next logits; `keep` drops every row not listed (rows that finished)."""

    def prefill(self, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None]) -> tuple[Any, np.ndarray]: ...

    def extend(self, state: Any, new: Any) -> Any: ...

    def step(self, state: Any, tokens: Sequence[int]) -> tuple[Any, np.ndarray]: ...

    def keep(self, state: Any, rows: Sequence[int]) -> Any: ...


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass
class Request:
    prompt_ids: list[int]
    adapter: str | None = None  # the name the model knows the adapter by; None = the base model
    params: SamplingParams = field(default_factory=SamplingParams)
    id: str = ""


@dataclass(frozen=True)
class Delta:
    """New tokens of one request (and the text they completed, when a detokenizer is set)."""

    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class Finish:
    """The last event of a request: why it stopped and how many tokens it used.

    reason: "stop" (eos, stop token or stop string), "length" (max_tokens or the context), "cancelled",
    or "error" (then `error` says what went wrong)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Event = Delta | Finish


class TokenStream:
    """The events of one request, in order, ending with a `Finish`.

    With `on_event`, each event is handed to that callback (from the scheduler thread) as it happens; without
    it, events queue up for `get` / iteration."""

    def __init__(self, request: Request, on_event: Callable[[Event], None] | None = None):
        self.request = request
        self._on_event = on_event
        self._events: deque[Event] = deque()
        self._cond = threading.Condition()
        self.finished = False

    def put(self, event: Event) -> None:
        if isinstance(event, Finish):
            self.finished = True
        if self._on_event is not None:
            self._on_event(event)
            return
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> Event:
        with self._cond:
            if not self._cond.wait_for(lambda: self._events, timeout):
                raise TimeoutError(f"no event for request {self.request.id!r} within {timeout}s")
            return self._events.popleft()

    def __iter__(self):
        while True:
            event = self.get()
            yield event
            if isinstance(event, Finish):
                return

    def collect(self, timeout: float | None = None) -> tuple[list[int], str, Finish]:
        """Wait for the end: (token ids, text, finish)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ids: list[int] = []
        text = []
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            event = self.get(left)
            if isinstance(event, Finish):
                return ids, "".join(text), event
            ids += event.token_ids
            text.append(event.text)


@dataclass
class SchedulerStats:
    requests: int = 0  # submitted
    finished: int = 0
    cancelled: int = 0  # ... of which were cancelled (a client that went away) or cut by a stop()
    batches_formed: int = 0  # batches started from an empty scheduler
    mixed_batches: int = 0  # ... of which held more than one adapter (the base model counts as one)
    joins: int = 0  # prefill groups appended to a running batch
    joined_rows: int = 0
    mixed_joins: int = 0  # joins after which the running rows held more than one adapter
    prefill_rows: int = 0
    steps: int = 0  # decode steps
    row_steps: int = 0  # sum over decode steps of the rows in the step
    mixed_steps: int = 0  # decode steps whose rows held more than one adapter
    max_rows: int = 0
    tokens: int = 0  # generated tokens
    request_ms: float = 0.0  # sum over finished requests of submit -> finish (queue + prefill + decode)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean_rows_per_step"] = round(self.row_steps / self.steps, 3) if self.steps else 0.0
        out["request_ms"] = round(self.request_ms, 3)
        return out


@dataclass
class _Row:
    stream: TokenStream
    text: IncrementalText | None
    sampling: Any  # runtime.sampling.SamplingParams
    rng: np.random.Generator | None
    arrived: float
    tokens: list[int] = field(default_factory=list)
    done: str | None = None  # finish reason, once decided

    @property
    def request(self) -> Request:
        return self.stream.request


class Scheduler:
    def __init__(
        self,
        model: BatchModel,
        *,
        max_batch_size: int = 32,
        batch_wait_ms: float = 10.0,
        eos_token_ids: Sequence[int] = (),
        context_length: int | None = None,
        mix_adapters: bool = True,
        max_adapters_per_batch: int | None = None,
        detokenize: Callable[[Sequence[int]], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_adapters_per_batch is not None and max_adapters_per_batch < 1:
            raise ValueError("max_adapters_per_batch must be at least 1")
        self.model = model
        self.max_batch_size = max_batch_size
        self.batch_wait = max(0.0, batch_wait_ms) / 1000.0
        self.eos_token_ids = frozenset(eos_token_ids)
        self.context_length = context_length
        self.mix_adapters = mix_adapters
        self.max_adapters = max_adapters_per_batch  # distinct adapters (the base model counts as one) per batch
        self.detokenize = detokenize
        self.clock = clock
        self.stats = SchedulerStats()
        self._waiting: deque[_Row] = deque()
        self._cancelled: set[str] = set()
        self._cond = threading.Condition()
        self._running: list[_Row] = []
        self._state: Any = None
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- any thread ---------------------------------------------------------------------------------------
    def submit(self, request: Request, on_event: Callable[[Event], None] | None = None) -> TokenStream:
        p = request.params
        if not request.prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        if p.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {p.max_tokens}")
        if self.context_length is not None and len(request.prompt_ids) >= self.context_length:
            raise ValueError(
                f"the prompt has {len(request.prompt_ids)} tokens; the context holds {self.context_length}"
            )
        if (p.stop and self.detokenize is None) or (p.stop and not all(p.stop)):
            raise ValueError("stop strings need a tokenizer and must be non-empty")
        if not request.id:
            request.id = f"req-{next(self._ids)}"
        stream = TokenStream(request, on_event)
        text = IncrementalText(self.detokenize, p.stop) if self.detokenize is not None else None
        # imported here, not at the top: `lora_export.runtime` pulls in torch, which the HTTP ingress (this
        # module's other user, for SamplingParams) has no use for
        from lora_export.runtime.sampling import SamplingParams as RowSampling

        sampling = RowSampling(
            temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed, max_new_tokens=p.max_tokens
        )
        row = _Row(stream, text, sampling, None if sampling.greedy else sampling.rng(), self.clock())
        with self._cond:
            self.stats.requests += 1
            self._waiting.append(row)
            self._cond.notify_all()
        return stream

    def cancel(self, request_id: str) -> None:
        """The request leaves at the next step boundary with a "cancelled" finish (a client went away)."""
        with self._cond:
            self._cancelled.add(request_id)
            self._cond.notify_all()

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._waiting and not self._running

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run the step loop in a daemon thread until `stop()`."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="lora-export-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for row in [*self._running, *self._waiting]:
            self._finish(row, "cancelled")
        self._running, self._state = [], None
        self._waiting.clear()

    def _loop(self) -> None:
        while not self._stopping:
            try:
                self.step(timeout=0.5)
            except Exception as e:  # a bug: fail what was running, keep serving the rest
                log.exception("scheduler step failed")
                for row in self._running:
                    self._finish(row, "error", f"{type(e).__name__}: {e}")
                self._running, self._state = [], None

    # -- the scheduler thread -----------------------------------------------------------------------------
    def step(self, timeout: float | None = 0.0) -> bool:
        """One iteration: admit waiting requests (a new batch, or a join at this step boundary), then one
        decode step for every running row. Waits up to `timeout` for work when idle. Returns whether any
        model call ran."""
        self._drop_cancelled()
        new = self._admit(timeout)
        worked = False
        if new:
            self._prefill(new)
            worked = True
        self._leave()
        if self._running:
            self._decode()
            self._leave()
            worked = True
        return worked

    def _admit(self, timeout: float | None) -> list[_Row]:
        with self._cond:
            if not self._running:
                if not self._waiting:
                    if not timeout or not self._cond.wait_for(lambda: self._waiting or self._stopping, timeout):
                        return []
                    if self._stopping:
                        return []
                # a new batch: hold the window open for more requests
                adapter = None if self.mix_adapters else self._waiting[0].request.adapter
                deadline = self._waiting[0].arrived + self.batch_wait
                while not self._stopping and len(self._eligible(adapter)) < self.max_batch_size:
                    left = deadline - self.clock()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                return self._take(self._eligible(adapter), self.max_batch_size)
            room = self.max_batch_size - len(self._running)
            if room <= 0 or not self._waiting:
                return []
            adapter = None if self.mix_adapters else self._running[0].request.adapter
            return self._take(self._eligible(adapter), room)

    def _eligible(self, adapter: str | None) -> list[_Row]:
        """Under the lock: waiting rows that may share a batch with `adapter` (all of them when mixing)."""
        if self.mix_adapters:
            return list(self._waiting)
        return [r for r in self._waiting if r.request.adapter == adapter]

    def _take(self, rows: list[_Row], n: int) -> list[_Row]:
        """The first `n` of `rows` in arrival order; with `max_adapters`, only while the batch's distinct adapters
        stay within it. A row whose adapter does not fit stops the taking (first come, first served): later
        rows of adapters already running do not overtake it, so the batch drains until its adapter fits and a
        rare adapter is never starved by busy ones."""
        if self.max_adapters is None:
            taken = rows[:n]
        else:
            active = {r.request.adapter for r in self._running}
            taken = []
            for r in rows:
                if len(taken) == n:
                    break
                if r.request.adapter not in active and len(active) >= self.max_adapters:
                    break
                active.add(r.request.adapter)
                taken.append(r)
        ids = {id(r) for r in taken}
        self._waiting = deque(r for r in self._waiting if id(r) not in ids)
        return taken

    def _prefill(self, rows: list[_Row]) -> None:
        joining = bool(self._running)
        try:
            state, logits = self.model.prefill([r.request.prompt_ids for r in rows], [r.request.adapter for r in rows])
            if joining:
                state = self.model.extend(self._state, state)
        except Exception as e:  # a bad adapter file, an ORT failure: these rows fail, the rest go on
            for row in rows:
                self._finish(row, "error", f"{type(e).__name__}: {e}")
            return
        s = self.stats
        s.prefill_rows += len(rows)
        if joining:
            s.joins += 1
            s.joined_rows += len(rows)
        else:
            s.batches_formed += 1
            s.mixed_batches += _mixed(rows)
        self._state = state
        self._running += rows
        if joining:
            s.mixed_joins += _mixed(self._running)
        s.max_rows = max(s.max_rows, len(self._running))
        self._emit(rows, logits)

    def _decode(self) -> None:
        rows = self._running
        try:
            self._state, logits = self.model.step(self._state, [r.tokens[-1] for r in rows])
        except Exception as e:  # the batch state is lost: every running row fails
            for row in rows:
                self._finish(row, "error", f"{type(e).__name__}: {e}")
            self._running, self._state = [], None
            return
        s = self.stats
        s.steps += 1
        s.row_steps += len(rows)
        s.mixed_steps += _mixed(rows)
        self._emit(rows, logits)

    def _emit(self, rows: list[_Row], logits: np.ndarray) -> None:
        tokens = sample_rows(logits, rows)
        self.stats.tokens += len(rows)
        for row, token in zip(rows, tokens):
            p = row.request.params
            row.tokens.append(token)
            text = ""
            if token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos):
                row.done = "stop"
            if row.text is not None:
                text, hit = row.text.add(row.tokens, final=False)
                if hit:
                    row.done = "stop"
            if row.done is None and (
                len(row.tokens) >= p.max_tokens
                or (
                    self.context_length is not None
                    and len(row.request.prompt_ids) + len(row.tokens) >= self.context_length
                )
            ):
                row.done = "length"
            if row.done is not None and row.text is not None:
                text += row.text.flush(row.tokens)
            row.stream.put(Delta([token], text))

    def _drop_cancelled(self) -> None:
        with self._cond:
            if not self._cancelled:
                return
            cancelled, self._cancelled = self._cancelled, set()
            waiting = [r for r in self._waiting if r.request.id in cancelled]
            self._waiting = deque(r for r in self._waiting if r.request.id not in cancelled)
        for row in waiting:
            self._finish(row, "cancelled")
        for row in self._running:
            if row.request.id in cancelled and row.done is None:
                row.done = "cancelled"
        self._leave()

    def _leave(self) -> None:
        """Finished rows leave the batch now (a step boundary)."""
        if not any(r.done for r in self._running):
            return
        keep = [i for i, r in enumerate(self._running) if r.done is None]
        for row in self._running:
            if row.done is not None:
                self._finish(row, row.done)
        self._running = [self._running[i] for i in keep]
        self._state = self.model.keep(self._state, keep) if keep else None

    def _finish(self, row: _Row, reason: str, error: str | None = None) -> None:
        if row.stream.finished:
            return
        self.stats.finished += 1
        self.stats.cancelled += reason == "cancelled"
        self.stats.request_ms += (self.clock() - row.arrived) * 1000.0
        row.stream.put(Finish(reason, len(row.request.prompt_ids), len(row.tokens), error))


def _mixed(rows: list[_Row]) -> int:
    return int(len({r.request.adapter for r in rows}) > 1)


def sample_rows(logits: np.ndarray, rows: list[_Row]) -> list[int]:
    """One token per row, greedy or sampled with the row's own parameters and seeded generator (the generator's
    `runtime.sampling`), so a seeded request samples the same tokens whatever else shares its batch."""
    from lora_export.runtime.sampling import pick_rows

    return pick_rows(np.asarray(logits), [r.sampling for r in rows], [r.rng for r in rows]).tolist()
