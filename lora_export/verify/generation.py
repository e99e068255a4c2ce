"""Generation check of a decoder folder: greedy tokens vs transformers `generate` on the PyTorch model.

The reference is the PyTorch model with the adapter resident and unmerged (PEFT's forward), running
transformers `generate` with its own KV cache on each prompt ALONE (no padding). The candidate is our
`Generator` on the folder, running all prompts of a case as ONE left-padded batch through the batch-level
API (prefill, then decode steps), so padding, per-row positions and per-row adapters are what is checked.

Per case: tokens must be identical (greedy, eos ignored so every row runs `new_tokens` steps); the
next-token logits of every step up to the first differing token are compared (max abs error) against an fp32
atol from `verify.tolerance.fp32_tolerance`: the logits' scale, and the reference's own noise measured by
recomputing its logits in one full-sequence forward (no cache) and comparing with `generate`'s. When the
folder has adapters, the adapter must move the logits visibly above the error (a dropped adapter fails).

Cases by layout: merged -> the folded adapter (or the base model); inputs -> each adapter, then none;
bank -> one batch whose rows cycle through the adapters and none.

A quantized folder (`optimize --quantize`) cannot be token-exact: it passes on greedy-token agreement (the
share of positions where its tokens equal the reference's, `GENERATION_AGREEMENT[scheme]`), the first
token of every row equal, and the first step's logits cosine (`parity.QUANTIZED_CRITERIA`); with an adapter,
its first logits must be much nearer the adapter's reference than the base model's (`NEARER_ADAPTER`): the
quantization noise of a real model can be as large as a fine-tune's effect, this ratio tells them apart.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_export.adapters.adapter import Adapter
from lora_export.adapters.inject import attach_adapter, lora_layers
from lora_export.adapters.peft_io import read_adapter
from lora_export.artifacts.decoder_folder import DecoderFolder, read_folder
from lora_export.contract import BANK, INPUTS, MERGED
from lora_export.errors import UserError
from lora_export.models.loading import LoadedModel
from lora_export.verify.tolerance import fp32_tolerance

DEFAULT_SHAPES = [(1, 8), (3, 11)]  # (rows, longest prompt); rows get different lengths (left padding)
# quantized folders: minimum share of greedy positions equal to the float reference's
GENERATION_AGREEMENT = {"int8": 0.75, "int8-block": 0.9, "int4": 0.5}
# quantized folders with an adapter: mean |ours - adapter reference| / mean |ours - base reference| at the first
# step must stay below this: with noise n and effect e, a live adapter gives about n / sqrt(e² + n²) < 1, a
# dropped one sqrt(e² + n²) / n > 1. An adapter whose effect is below the quantization noise cannot be told
# apart (measured: SmolLM2 4-layer int4, noise 0.66 vs a 0.05-std adapter's 0.17): that case fails, saying so.
NEARER_ADAPTER = 1.0


@dataclass
class GenerationCase:
    label: str
    adapters: list[str | None]
    prompt_lengths: list[int]
    reference: list[list[int]]
    candidate: list[list[int]]
    first_mismatch: list[int | None]  # per row: the first step whose token differs, None when identical
    max_logits_err: float  # over every row and step up to the first mismatch
    effect: float | None = None  # max |logits(adapter) - logits(base)| at the first step, when an adapter is used
    passed: bool = False
    reason: str = ""
    agreement: float | None = None  # share of equal greedy tokens (every row and position)
    first_logits_cosine: float | None = None  # quantized folders: the first step's logits vs the reference
    atol: float | None = None  # the logits tolerance this case was judged with
    tolerance: dict | None = None  # how it was reached (`verify.tolerance.Tolerance`), fp32 folders


@dataclass
class GenerationReport:
    folder: str
    layout: str
    new_tokens: int
    atol: float | None  # the caller's logits atol; None: each case's own (`verify.tolerance`), see cases
    cases: list[GenerationCase] = field(default_factory=list)
    quantization: str | None = None  # the folder's scheme: agreement criteria instead of token-exact

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    def worst(self) -> float:
        return max((c.max_logits_err for c in self.cases), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def make_prompts(vocab: int, rows: int, longest: int, seed: int) -> list[list[int]]:
    """`rows` prompts of different lengths (the longest first), random ids in [1, vocab)."""
    rng = np.random.default_rng(seed)
    lengths = [max(1, longest - 3 * i) for i in range(rows)]
    return [rng.integers(1, vocab, size=n).tolist() for n in lengths]


class Reference:
    """The PyTorch model with one adapter resident at a time; greedy transformers `generate`. A lazily loaded
    model is loaded here (owned, released with the reference); a caller's float32 model gets a new module tree
    over its own tensors (LoRA layers wrap that tree, the caller's model is untouched, no weight is copied)."""

    def __init__(self, loaded: LoadedModel):
        self.model = loaded.owned().module.eval()

    def use(self, adapter: Adapter | None) -> None:
        if adapter is not None:
            attach_adapter(self.model, adapter)
        else:
            for layer in lora_layers(self.model).values():
                layer.set_lora(None)

    def reordered_logits(self, prompt: list[int], tokens: list[int]) -> np.ndarray:
        """The logits `generate` gave for `tokens`, recomputed by one full-sequence forward without a cache:
        the same fp32 model under another evaluation order, whose difference is the reference's own noise."""
        ids = torch.tensor([prompt + tokens[:-1]], dtype=torch.long)
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return out.logits[0, len(prompt) - 1 :].float().numpy()

    def generate(self, prompt: list[int], new_tokens: int) -> tuple[list[int], np.ndarray]:
        """(tokens, logits `[new_tokens, vocab]`) of greedy `generate` on one prompt, eos ignored."""
        config = copy.deepcopy(self.model.generation_config)
        # every row runs `new_tokens` steps: no eos at all (None would be replaced by the model's default)
        config.eos_token_id = []
        config.do_sample = False
        config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
        config.max_new_tokens = new_tokens
        config.output_logits = True
        config.return_dict_in_generate = True
        ids = torch.tensor([prompt], dtype=torch.long)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        tokens = out.sequences[0, len(prompt) :].tolist()
        return tokens, torch.stack([step[0] for step in out.logits]).float().numpy()


def greedy_batch(gen, prompts: list[list[int]], rows: list[str | None], new_tokens: int):
    """Our side: one left-padded batch, greedy, eos ignored; (tokens per row, logits `[rows, steps, vocab]`)."""
    batch = gen.prefill(prompts, adapters=rows if gen.layout == BANK else None, adapter=_one(rows, gen.layout))
    logits, tokens = [], []
    for i in range(new_tokens):
        logits.append(batch.logits.copy())
        next_tokens = np.argmax(batch.logits, axis=-1)
        tokens.append(next_tokens)
        if i + 1 < new_tokens:
            gen.step(batch, next_tokens)
    return np.stack(tokens, axis=1).tolist(), np.stack(logits, axis=1)


def _one(rows: list[str | None], layout: str) -> str | None:
    return None if layout == BANK else rows[0]


def verify_generation(
    loaded: LoadedModel,
    folder: str | Path,
    adapters: list[Adapter] = (),
    *,
    new_tokens: int = 16,
    shapes: list[tuple[int, int]] | None = None,
    seeds: list[int] = (0,),
    atol: float | None = None,
) -> GenerationReport:
    from lora_export.passes.quantize import graph_scheme

    info = read_folder(folder)
    adapters = list(adapters)
    # a fused folder runs under GenAI, the runtime it is written for; a fused bank one (GenAI feeds no adapter
    # index) and traced ones under our Generator
    genai = info.fused and info.layout != BANK
    candidate = _genai_candidate(info, adapters) if genai else _generator_candidate(info, adapters)
    with candidate as (layout, greedy):
        if layout != MERGED and not adapters:
            adapters = [read_adapter(p, name=n) for n, p in info.adapter_files.items()]
        dtype = (info.manifest.dtype if info.manifest is not None else "fp32") or "fp32"
        if atol is None and dtype != "fp32":
            atol = 5e-2
        scheme = graph_scheme(info.model_path)
        report = GenerationReport(str(folder), layout, new_tokens, atol, quantization=scheme)
        runs = []  # our side of every case first: the session holds the weights only until it closes
        for rows_needed, longest in shapes or DEFAULT_SHAPES:
            for seed in seeds:
                prompts = make_prompts(info.facts.vocab_size, rows_needed, longest, seed)
                for label, rows in _cases(layout, adapters, len(prompts)):
                    fed = rows if layout != MERGED else [None] * len(rows)
                    ours = greedy(prompts, fed, new_tokens)
                    runs.append((f"{label} {rows_needed}x{longest} seed {seed}", prompts, rows, ours))
    ref = Reference(loaded)  # then the PyTorch side: one copy of the weights in memory at a time
    by_name = {a.name: a for a in adapters}
    for name, prompts, rows, ours in runs:
        report.cases.append(_run_case(ref, by_name, name, prompts, rows, ours, new_tokens, atol, scheme))
    return report


def _check_given(layout: str, given: list[Adapter]) -> None:
    if layout == MERGED and len(given) > 1:
        raise UserError("a merged folder folds one adapter: give the one it was exported with (or none)")


@contextlib.contextmanager
def _generator_candidate(info: DecoderFolder, given: list[Adapter]):
    """Our `Generator` on a folder, all prompts of a case as one batch (left-padded; right-padded when fused);
    given adapters replace the folder's own of the same name. Yields (layout, greedy(prompts, rows, new_tokens))."""
    from lora_export.runtime.generator import Generator

    with Generator(info) as gen:
        _check_given(gen.layout, given)
        if gen.layout != MERGED:
            for a in given:
                gen.load_adapter(a.name, a)
        yield gen.layout, lambda prompts, rows, n: greedy_batch(gen, prompts, rows, n)


@contextlib.contextmanager
def _genai_candidate(info: DecoderFolder, given: list[Adapter]):
    """A fused folder (`export-decoder --fused`) under ONNX Runtime GenAI, the runtime it is written for: each
    prompt alone (GenAI's own batching is not ours to check), adapters through `og.Adapters`, the model and the
    adapters loaded once for every case."""
    import tempfile

    from lora_export.adapters.pack import pack_adapter

    _check_given(info.layout, given)
    with tempfile.TemporaryDirectory(prefix="lora_verify_") as tmp:
        files = dict(info.adapter_files)
        if info.layout != MERGED:
            for a in given:  # given adapters replace the folder's own of the same name
                files[a.name] = pack_adapter(a, Path(tmp) / f"{a.name}.onnx_adapter", graph=info.model_path)
        model, adapters = _genai_open(info.path, files)
        yield info.layout, lambda prompts, rows, n: _genai_greedy(model, adapters, prompts, rows, n)


def greedy_genai(folder, prompts: list[list[int]], rows: list[str | None], files: dict[str, Path], new_tokens: int):
    """ONNX Runtime GenAI, greedy, eos ignored, one prompt at a time; (tokens per row, logits `[rows, steps,
    vocab]`). The next token is chosen here from the logits GenAI returns, so every row runs `new_tokens`."""
    model, adapters = _genai_open(folder, {n: files[n] for n in {r for r in rows if r is not None}})
    return _genai_greedy(model, adapters, prompts, rows, new_tokens)


def _genai_open(folder, files: dict[str, Path]):
    """(og.Model, og.Adapters holding `files` by name, or None when there are none)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    adapters = None
    if files:
        adapters = og.Adapters(model)
        for name, path in sorted(files.items()):
            adapters.load(str(path), name)
    return model, adapters


def _genai_greedy(model, adapters, prompts: list[list[int]], rows: list[str | None], new_tokens: int):
    import onnxruntime_genai as og

    tokens, logits = [], []
    for prompt, row in zip(prompts, rows):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
        gen = og.Generator(model, params)
        if row is not None:
            gen.set_active_adapter(adapters, row)
        gen.append_tokens(np.array([prompt], dtype=np.int32))
        row_tokens, row_logits = [], []
        for i in range(new_tokens):
            step = np.asarray(gen.get_output("logits"), dtype=np.float32)[0, -1]
            row_logits.append(step.copy())
            row_tokens.append(int(np.argmax(step)))
            if i + 1 < new_tokens:
                gen.append_tokens(np.array([[row_tokens[-1]]], dtype=np.int32))
        tokens.append(row_tokens)
        logits.append(np.stack(row_logits))
        del gen
    return tokens, np.stack(logits)


def _cases(layout: str, adapters: list[Adapter], n: int) -> list[tuple[str, list[str | None]]]:
    if layout == MERGED:
        return [(f"merged {adapters[0].name}" if adapters else "base", [adapters[0].name if adapters else None] * n)]
    if layout == INPUTS:
        return [(f"adapter {a.name}", [a.name] * n) for a in adapters] + [("no adapter", [None] * n)]
    cycle = [a.name for a in adapters] + [None]
    rows = [cycle[i % len(cycle)] for i in range(n)]
    return [("bank rows " + ",".join(r or "-" for r in rows), rows)]


def _run_case(ref, by_name, label, prompts, rows, ours, new_tokens, atol, scheme=None) -> GenerationCase:
    """Judge our (tokens, logits) for one case against the reference's greedy generate, row by row."""
    ours, our_logits = ours
    case = GenerationCase(label, rows, [len(p) for p in prompts], [], ours, [], 0.0)
    effect, first_err, cosines, noise_ref, ref_logits, worst_nearer = None, 0.0, [], 0.0, [], 0.0
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        ref.use(by_name.get(row) if row is not None else None)
        tokens, logits = ref.generate(prompt, new_tokens)
        case.reference.append(tokens)
        if scheme is None and atol is None:  # the reference's own fp32 noise on these tokens
            noise_ref = max(noise_ref, float(np.abs(ref.reordered_logits(prompt, tokens) - logits).max()))
        ref_logits.append(logits)
        mismatch = next((j for j, (a, b) in enumerate(zip(tokens, ours[i])) if a != b), None)
        case.first_mismatch.append(mismatch)
        upto = new_tokens if mismatch is None else mismatch + 1
        err = float(np.abs(our_logits[i, :upto] - logits[:upto]).max())
        case.max_logits_err = max(case.max_logits_err, err)
        first_err = max(first_err, float(np.abs(our_logits[i, 0] - logits[0]).mean()))
        a, b = our_logits[i, 0].astype(np.float64), logits[0].astype(np.float64)
        cosines.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
        if row is not None:
            ref.use(None)
            _, base = ref.generate(prompt, 1)
            moved = float(np.abs(logits[0] - base[0]).max())
            effect = moved if effect is None else min(effect, moved)
            # quantized: how much nearer our first logits are to the adapter's reference than to the base model's
            to_base = float(np.abs(our_logits[i, 0] - base[0]).mean())
            nearer = float(np.abs(our_logits[i, 0] - logits[0]).mean()) / max(to_base, 1e-30)
            worst_nearer = max(worst_nearer, nearer)
    case.effect = effect
    pairs = [(a, b) for ref_row, our_row in zip(case.reference, ours) for a, b in zip(ref_row, our_row)]
    case.agreement = sum(a == b for a, b in pairs) / max(len(pairs), 1)
    problems = []
    if atol is None and scheme is None:
        tol = fp32_tolerance(np.stack(ref_logits), noise=noise_ref)
        atol, case.tolerance = tol.atol, tol.to_dict()
    case.atol = atol
    if scheme is None:
        if any(m is not None for m in case.first_mismatch):
            problems.append("tokens differ")
        if case.max_logits_err > atol:
            problems.append(f"logits error {case.max_logits_err:.2e} > {atol:g}")
        noise = case.max_logits_err
    else:
        from lora_export.verify.parity import QUANTIZED_CRITERIA

        case.first_logits_cosine = min(cosines)
        if case.agreement < GENERATION_AGREEMENT[scheme]:
            problems.append(f"greedy-token agreement {case.agreement:.3f} < {GENERATION_AGREEMENT[scheme]} ({scheme})")
        if any(m == 0 for m in case.first_mismatch):
            problems.append("the first token differs")
        if case.first_logits_cosine < QUANTIZED_CRITERIA[scheme]["cosine"]:
            problems.append(f"first-step logits cosine {case.first_logits_cosine:.4f} too low for {scheme}")
        noise = first_err
    if scheme is None and effect is not None and effect <= 10 * max(noise, 1e-7):
        problems.append(f"the adapter barely moves the logits ({effect:.2e}): dropped somewhere?")
    if scheme is not None and effect is not None and worst_nearer >= NEARER_ADAPTER:
        problems.append(
            f"the first logits are {worst_nearer:.2f}x as far from the adapter's reference as from the base "
            f"model's (needs < {NEARER_ADAPTER}): the adapter was dropped, or its effect is below the {scheme} noise"
        )
    case.passed, case.reason = not problems, "; ".join(problems)
    return case
