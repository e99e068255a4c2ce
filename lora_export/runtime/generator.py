"""`Generator`: text generation over a decoder folder (`export-decoder`), the KV cache kept in ONNX Runtime.

One ONNX Runtime session per folder; adapters resident by name (the `AdapterStore` that `LoraSession` uses:
`.onnx_adapter` + `RunOptions` for `inputs` folders, cached stacked banks for `bank` folders); the folder's
`adapters/NAME.onnx_adapter` files are loaded as NAME when the generator opens. Thread-safe: any number of
threads may generate at once, each with its own adapter; a batch belongs to one thread at a time.

Batch-level API (what a continuous-batching scheduler composes; `generate` and `stream` are built on it):

    gen = Generator("folder")
    batch = gen.prefill([[5, 6, 7], [8, 9]], adapters=["legal", None], keys=["a", "b"])   # Batch
    batch.logits                                   # (rows, vocab): each row's next-token logits
    gen.step(batch, [11, 12])                      # one token per row -> (rows, vocab); updates `batch`
    gen.step(batch, [[1, 2, 3], [4, 5, 6]])        # several tokens per row at once -> (rows, 3, vocab)
    batch = gen.join(batch, gen.prefill([[3, 4, 5, 6]], adapter="support", keys=["c"]))  # at a step boundary
    batch = gen.drop(batch, [batch.row_of("a")])   # finished rows leave

- `prefill(prompts, adapter=None | adapters=[...], keys=None) -> Batch`: prompts (lists of ids, any lengths,
  left-padded together, position ids `cumsum(mask) - 1`; right-padded on a fused folder, whose
  GroupQueryAttention takes each row's length from the mask) run from an empty cache (past length 0). `keys` are
  the caller's ids for the rows (`batch.keys`, `batch.row_of(key)`), unique in a batch; by default fresh ints
  unique within the generator, so any two prefills can join.
- `step(batch, tokens) -> logits`: appends `tokens` (`[rows]` or `[rows, k]`) to every row, one graph run
  (fused, k > 1 and several rows: k one-token runs, as GroupQueryAttention takes k tokens after a cache for one
  row only).
- `join(batch, other) -> Batch`: `other`'s rows join `batch`'s (KV padded to a common past with masked slots;
  position ids stay per row). On `inputs` folders all rows of a batch share one adapter; `bank` folders mix.
- `drop(batch, rows) -> Batch`: the rows at those indices leave; the rest keep their caches.
- `pick(batch, params, rngs) -> tokens` (see `runtime.sampling`) chooses each row's next token.

High level: `generate(prompts, adapter=..., adapters=..., max_new_tokens=..., temperature=..., top_k=...,
top_p=..., seed=..., stop_token_ids=...) -> GenerationResult`, and `stream(...)` yielding a `TokenEvent` per
row per step as the tokens come. A single prompt (one list of ids) is a batch of one.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_export.adapters.adapter import Adapter
from lora_export.artifacts.decoder_folder import DecoderFolder, read_folder
from lora_export.artifacts.onnxio import InitializerReader
from lora_export.backends.onnxrt import open_session
from lora_export.contract import (
    ADAPTER_INDEX,
    ATTENTION_MASK,
    BANK,
    INPUT_IDS,
    INPUTS,
    MERGED,
    POSITION_IDS,
    SlotTable,
    decoder_input_names,
    decoder_output_names,
    past_names,
)
from lora_export.errors import UserError
from lora_export.runtime import batch as batch_mod
from lora_export.runtime.adapter_store import AdapterStore
from lora_export.runtime.batch import Batch
from lora_export.runtime.sampling import SamplingParams, pick_rows

Prompts = Sequence[int] | Sequence[Sequence[int]]


@dataclass
class TokenEvent:
    """One new token of one row; `finish_reason` is set on the row's last token ("stop" or "length")."""

    row: int
    token: int
    finish_reason: str | None = None


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row (a stop token is included)
    finish_reasons: list[str]
    prompt_lengths: list[int]
    ttft_ms: float = 0.0  # prefill + first token
    step_ms: list[float] = field(default_factory=list)  # each decode step after the first token

    @property
    def ms_per_token(self) -> float:
        return float(np.median(self.step_ms)) if self.step_ms else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "finish_reasons": self.finish_reasons,
            "prompt_lengths": self.prompt_lengths,
            "ttft_ms": self.ttft_ms,
            "ms_per_token": self.ms_per_token,
            "steps": len(self.step_ms),
        }


@dataclass
class _Lora:
    """The LoRA part of a batch's feeds, prepared once per set of rows."""

    run_options: Any = None
    values: dict[str, Any] = field(default_factory=dict)


class Generator:
    def __init__(
        self,
        folder: str | Path | DecoderFolder,
        *,
        providers: list[str] | None = None,
        threads: int | None = None,
        io_binding: bool = True,
        spinning: bool = True,
        load_folder_adapters: bool = True,
    ):
        self.folder = folder if isinstance(folder, DecoderFolder) else read_folder(folder)
        self.facts = self.folder.facts
        self.session = open_session(self.folder.model_path, providers, threads, spinning=spinning)
        self.slots = SlotTable.from_session(self.session, InitializerReader(self.folder.model_path))
        # a fused graph (GroupQueryAttention) takes no position ids: it reads each row's length off the mask's row
        # sums and places new tokens there, so its rows are right-padded (`Batch.right`)
        self.fused = self.folder.fused
        self.input_names = decoder_input_names(self.facts.num_layers)
        if self.fused:
            self.input_names.remove(POSITION_IDS)
        self.output_names = decoder_output_names(self.facts.num_layers)
        self._check_graph()
        self.io_binding = io_binding
        # ONNX Runtime applies `RunOptions` adapters in `run` but not in `run_with_iobinding`: with IO binding the
        # adapter tensors are bound as inputs (prepared OrtValues) instead
        self.store = AdapterStore(self.slots, use_ort_adapters=not io_binding) if self.slots.layout != MERGED else None
        self._dtype = np.float16 if self._past_type() == "tensor(float16)" else np.float32
        self._tokenizer = None
        self._keys = itertools.count()  # default row keys: unique within this generator, so batches can join
        if load_folder_adapters and self.store is not None:
            for name, path in self.folder.adapter_files.items():
                self.store.load(name, path)

    @property
    def layout(self) -> str:
        return self.slots.layout

    def _check_graph(self) -> None:
        have = {i.name for i in self.session.get_inputs()}
        missing = [n for n in self.input_names if n not in have]
        outs = {o.name for o in self.session.get_outputs()}
        missing += [n for n in self.output_names if n not in outs]
        if missing:
            raise UserError(
                f"{self.folder.model_path} lacks the decoder I/O {', '.join(missing[:3])}: re-export it with "
                "export-decoder"
            )

    def _past_type(self) -> str:
        return next(i.type for i in self.session.get_inputs() if i.name == past_names(0)[0])

    # -- adapters -------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, source: str | Path | Adapter, *, allow_nonfinite: bool = False) -> Adapter:
        """Make an adapter resident as `name` (PEFT dir, .onnx_adapter/.safetensors/.npz file, or an Adapter)."""
        if self.store is None:
            raise self._merged_error()
        return self.store.load(name, source, allow_nonfinite=allow_nonfinite)

    def unload(self, name: str) -> None:
        if self.store is None:
            raise self._merged_error()
        self.store.unload(name)

    def adapters(self) -> list[str]:
        return self.store.names() if self.store is not None else []

    def _merged_error(self) -> UserError:
        return UserError(
            f"{self.folder.path} is a merged decoder (its adapter is folded in): export it with --layout inputs or "
            "bank to choose adapters at run time"
        )

    def _row_adapters(self, n: int, adapter: str | None, adapters: Sequence[str | None] | None) -> list[str | None]:
        if adapters is not None and adapter is not None:
            raise UserError("give adapter= (the whole batch) or adapters= (one per row), not both")
        rows = list(adapters) if adapters is not None else [adapter] * n
        if len(rows) != n:
            raise UserError(f"adapters names {len(rows)} row(s) but there are {n} prompt(s): give one name per row")
        named = {r for r in rows if r is not None}
        if named and self.store is None:
            raise self._merged_error()
        if self.layout == INPUTS and len(set(rows)) > 1:
            raise UserError(
                f"per-row adapters need a bank folder (export-decoder --layout bank); {self.folder.path} is an "
                "inputs folder: one adapter per batch"
            )
        resident = self.store.snapshot() if self.store is not None else {}
        for name in sorted(named):
            self.store.get(name, resident)  # one clear line for an unknown name
        return rows

    # -- the batch-level API --------------------------------------------------------------------------------
    def prefill(
        self,
        prompts: Prompts,
        *,
        adapter: str | None = None,
        adapters: Sequence[str | None] | None = None,
        keys: Sequence[Any] | None = None,
    ) -> Batch:
        """New rows from their prompts (left-padded together), run from an empty cache."""
        prompts = as_prompts(prompts)
        rows = self._row_adapters(len(prompts), adapter, adapters)
        keys = list(keys) if keys is not None else [next(self._keys) for _ in prompts]
        if len(keys) != len(prompts) or len(set(map(_hashable, keys))) != len(keys):
            raise UserError(f"keys must name each of the {len(prompts)} prompt(s) once, got {keys!r}")
        lengths = [len(p) for p in prompts]
        for length in lengths:
            if length == 0:
                raise UserError("an empty prompt: give at least one token id")
            if length > self.facts.context_length:
                raise UserError(
                    f"a prompt of {length} tokens is longer than the model's context ({self.facts.context_length} "
                    "tokens): shorten it"
                )
        vocab = self.facts.vocab_size
        for p in prompts:
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise UserError(
                    f"token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1}): "
                    "check the prompt's ids or the tokenizer"
                )
        width = max(lengths)
        ids = np.full((len(prompts), width), self.facts.pad, dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for i, p in enumerate(prompts):
            cols = slice(0, len(p)) if self.fused else slice(width - len(p), width)
            ids[i, cols] = p
            mask[i, cols] = 1
        positions = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1)  # transformers' left-padding convention
        empty = np.zeros((len(prompts), self.facts.num_key_value_heads, 0, self.facts.head_size), dtype=self._dtype)
        batch = Batch(
            keys=keys,
            adapters=rows,
            mask=np.zeros((len(prompts), 0), dtype=np.int64),
            positions=np.zeros(len(prompts), dtype=np.int64),
            past=batch_mod.as_values([empty] * (2 * self.facts.num_layers), self.io_binding),
            logits=np.zeros((len(prompts), self.facts.vocab_size), dtype=np.float32),
            right=self.fused,
        )
        logits = self._advance(batch, ids, mask, positions)
        batch.positions = np.asarray(lengths, dtype=np.int64)
        if self.fused:  # each row's next-token logits sit at its own last token
            batch.logits = np.ascontiguousarray(logits[np.arange(len(prompts)), batch.positions - 1], np.float32)
        return batch

    def step(self, batch: Batch, tokens: Sequence[int] | Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Append `tokens` to every row (`[rows]`, or `[rows, k]` for k at once) in one run; returns the next-token
        logits `[rows, vocab]` (`[rows, k, vocab]` for a 2-D `tokens`). `batch` is updated in place."""
        ids = np.asarray(tokens, dtype=np.int64)
        single = ids.ndim == 1
        ids = ids[:, None] if single else ids
        if ids.ndim != 2 or ids.shape[0] != batch.rows or ids.shape[1] == 0:
            raise UserError(
                f"step takes one token (or k tokens) per row: got shape {list(np.shape(tokens))}, {batch.rows} row(s)"
            )
        k = ids.shape[1]
        if int(batch.positions.max(initial=0)) + k > self.facts.context_length:
            raise UserError(f"a row would pass the model's context ({self.facts.context_length} tokens): drop it first")
        if batch.right and k > 1 and batch.rows > 1:  # GroupQueryAttention takes k new tokens after a cache for one row
            steps = [self.step(batch, ids[:, j]) for j in range(k)]  # only: k one-token runs compute the same
            return np.stack(steps, axis=1)
        if batch.right:  # each row's k tokens follow its own length; the cache grows by k columns
            width = batch.past_length + k
            mask = (np.arange(width)[None, :] < (batch.positions + k)[:, None]).astype(np.int64)
        else:
            mask = np.concatenate([batch.mask, np.ones((batch.rows, k), dtype=np.int64)], axis=1)
        positions = batch.positions[:, None] + np.arange(k, dtype=np.int64)[None, :]
        logits = self._advance(batch, ids, mask, positions)
        batch.positions = batch.positions + k
        return logits[:, -1] if single else logits

    def join(self, batch: Batch, other: Batch) -> Batch:
        """`other`'s rows join `batch` at a step boundary; returns the joined batch (use it, not the inputs)."""
        if self.layout != BANK and batch.rows and other.rows and set(batch.adapters) != set(other.adapters):
            raise UserError(
                "rows with different adapters need a bank folder (export-decoder --layout bank) to share a batch"
            )
        shared = set(map(_hashable, batch.keys)) & set(map(_hashable, other.keys))
        if shared:
            raise UserError(f"rows {sorted(map(repr, shared))[:3]} are in both batches: keys must stay unique")
        return batch_mod.join(batch, other, self.io_binding)

    def drop(self, batch: Batch, rows: Sequence[int]) -> Batch:
        """The batch without the rows at indices `rows`; returns it (use it, not the input)."""
        gone = set(int(r) for r in rows)
        bad = sorted(r for r in gone if not 0 <= r < batch.rows)
        if bad:
            raise UserError(f"drop: row(s) {bad[:3]} not in a batch of {batch.rows}")
        return batch_mod.select(batch, [i for i in range(batch.rows) if i not in gone], self.io_binding)

    @staticmethod
    def pick(batch: Batch, params: Sequence[SamplingParams], rngs: Sequence[Any]) -> np.ndarray:
        """Each row's next token from `batch.logits` (greedy or sampled per its parameters)."""
        return pick_rows(batch.logits, params, rngs)

    # -- one graph run ---------------------------------------------------------------------------------------
    def _lora(self, batch: Batch) -> _Lora:
        if batch.lora is not None:
            return batch.lora
        lora = _Lora()
        if self.layout == BANK:
            values = self.store.bank_feeds(batch.adapters)
            if self.fused:  # its bank gathers each row's entry (rows at -1 masked): an empty bank gets a zero one
                values = {
                    n: v if n == ADAPTER_INDEX or len(v) else np.zeros((1, *v.shape[1:]), v.dtype)
                    for n, v in values.items()
                }
            lora.values = dict(zip(values, batch_mod.as_values(list(values.values()), self.io_binding)))
        elif self.layout == INPUTS and batch.rows:
            lora.run_options, lora.values = self.store.activation(batch.adapters[0])
        batch.lora = lora
        return lora

    def _advance(self, batch: Batch, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Run the graph on `ids` after `batch`'s cache; store the new cache, mask and last logits in `batch`."""
        lora = self._lora(batch)
        small = {INPUT_IDS: ids, ATTENTION_MASK: mask}
        if not self.fused:
            small[POSITION_IDS] = np.ascontiguousarray(positions)
        past_inputs = self.input_names[len(small) :]
        if self.io_binding:
            io = self.session.io_binding()
            for name, value in small.items():
                io.bind_cpu_input(name, value)
            for name, value in zip(past_inputs, batch.past):
                io.bind_ortvalue_input(name, value)
            for name, value in lora.values.items():
                io.bind_ortvalue_input(name, value)
            for name in self.output_names:
                io.bind_output(name, "cpu")
            self.session.run_with_iobinding(io, lora.run_options)
            outs = io.get_outputs()
            logits, present = outs[0].numpy(), list(outs[1:])
        else:
            feeds = {**small, **dict(zip(past_inputs, batch.past)), **lora.values}
            outs = self.session.run(self.output_names, feeds, lora.run_options)
            logits, present = outs[0], outs[1:]
        batch.past, batch.mask = present, mask
        batch.logits = np.ascontiguousarray(logits[:, -1].astype(np.float32, copy=False))
        return logits

    # -- generation ------------------------------------------------------------------------------------------
    def stream(
        self,
        prompts: Prompts,
        *,
        adapter: str | None = None,
        adapters: Sequence[str | None] | None = None,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        **knobs,
    ) -> Iterator[TokenEvent]:
        """Yield each row's tokens as they come (`TokenEvent(row, token, finish_reason)`); knobs are
        `SamplingParams` fields (max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids, ignore_eos)."""
        for events in self._steps(prompts, adapter, adapters, sampling, knobs):
            yield from events

    def generate(
        self,
        prompts: Prompts,
        *,
        adapter: str | None = None,
        adapters: Sequence[str | None] | None = None,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        **knobs,
    ) -> GenerationResult:
        """Generate for every prompt; the result holds each row's new tokens, why it stopped, and timings."""
        prompts = as_prompts(prompts)
        result = GenerationResult([[] for _ in prompts], [""] * len(prompts), [len(p) for p in prompts])
        start = last = time.perf_counter()
        for n, events in enumerate(self._steps(prompts, adapter, adapters, sampling, knobs)):
            now = time.perf_counter()
            if n == 0:
                result.ttft_ms = (now - start) * 1e3
            else:
                result.step_ms.append((now - last) * 1e3)
            last = now
            for event in events:
                result.tokens[event.row].append(event.token)
                if event.finish_reason:
                    result.finish_reasons[event.row] = event.finish_reason
        return result

    def _steps(self, prompts, adapter, adapters, sampling, knobs) -> Iterator[list[TokenEvent]]:
        """The generation loop on the batch-level API: pick, emit, drop finished rows, step the rest."""
        prompts = as_prompts(prompts)
        params = self._params(len(prompts), sampling, knobs)
        rngs = [p.rng() for p in params]
        batch = self.prefill(prompts, adapter=adapter, adapters=adapters, keys=range(len(prompts)))
        counts = [0] * len(prompts)
        while batch.rows:
            tokens = self.pick(batch, [params[k] for k in batch.keys], [rngs[k] for k in batch.keys])
            events, done = [], []
            for i, (key, token) in enumerate(zip(batch.keys, tokens.tolist())):
                counts[key] += 1
                reason = self._finish_reason(token, counts[key], int(batch.positions[i]), params[key])
                if reason is not None:
                    done.append(i)
                events.append(TokenEvent(key, token, reason))
            yield events
            if done:
                tokens = np.delete(tokens, done)
                batch = self.drop(batch, done)
            if batch.rows:
                self.step(batch, tokens)

    def _params(self, n: int, sampling, knobs: dict) -> list[SamplingParams]:
        if sampling is not None and knobs:
            raise UserError(f"give sampling= or keyword knobs ({', '.join(sorted(knobs))}), not both")
        if sampling is None:
            try:
                sampling = SamplingParams(**knobs)
            except TypeError as e:
                raise UserError(f"unknown generation option: {e}") from None
        params = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * n
        if len(params) != n:
            raise UserError(f"sampling names {len(params)} row(s) but there are {n} prompt(s)")
        return params

    def _finish_reason(self, token: int, count: int, position: int, params: SamplingParams) -> str | None:
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.facts.eos_token_id):
            return "stop"
        if count >= params.max_new_tokens or position >= self.facts.context_length:
            return "length"
        return None

    # -- text ------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The folder's tokenizer (transformers `AutoTokenizer`), or a one-line error when it has none."""
        if self._tokenizer is None:
            if not self.folder.has_tokenizer:
                raise UserError(
                    f"{self.folder.path} has no tokenizer files: pass token ids (--prompt-ids 1,2,3), or export "
                    "from a model directory that has a tokenizer"
                )
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.folder.path), local_files_only=True)
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """`messages` ([{"role", "content"}, ...]) through the folder's chat template, ready for the reply."""
        tok = self.tokenizer
        if not has_chat_template(tok):
            raise UserError(f"{self.folder.path}'s tokenizer has no chat template: give a plain --prompt instead")
        return chat_ids(tok, messages)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def close(self) -> None:
        self.session = None
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def as_prompts(prompts: Prompts) -> list[list[int]]:
    """One prompt (a list of ids) or several, as a list of lists of ints."""
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    prompts = list(prompts)
    if not prompts:
        raise UserError("no prompts given")
    if all(isinstance(t, (int, np.integer)) for t in prompts):
        return [[int(t) for t in prompts]]
    return [[int(t) for t in p] for p in prompts]


def _hashable(key: Any) -> Any:
    try:
        hash(key)
        return key
    except TypeError:
        return id(key)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of `messages` with the generation prompt (as transformers' `apply_chat_template`)."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return [int(i) for i in ids]


def max_token_chars(tokenizer: Any) -> int | None:
    """The most characters of text one token can stand for, when the tokenizer can say: a byte-level BPE
    without a normalizer (GPT-2, Llama 3, Qwen, SmolLM2), where every token is a run of bytes spelled by its
    vocabulary entry (one character per byte) and an added token is its own text. A text of more than
    context × this characters cannot fit the context, whatever it holds. None for any other tokenizer (a
    normalizer may shrink the text; an unknown-token model may fold a long span into one token)."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    config = json.loads(backend.to_str())
    pre = config.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = any(part.get("type") == "ByteLevel" for part in parts)
    if config.get("normalizer") is not None or config["model"].get("type") != "BPE" or not byte_level:
        return None
    return max(len(token) for token in tokenizer.get_vocab())
