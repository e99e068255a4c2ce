"""`export-decoder`: a causal LM with its KV cache, as a folder ONNX Runtime GenAI and our generator both run.

One graph serves prefill (past length 0), single-token decode and multi-token steps (`export.kv_cache`), with
Optimum / GenAI I/O names from `lora_export.contract`. Layouts:

- `merged`: at most one adapter, folded into the weights (`W0 + s·B·A`, as merge-and-export);
- `inputs`: the LoRA name contract of branched graphs (rank-0 defaults = the base model), one adapter per call;
- `bank`: a per-row adapter index `[batch]` plus the banks, so rows of one generating batch use different
  adapters.

The branched layouts are the same `export.branched` wiring (`lora_wiring`) and the same trace
(`export.trace`) as `export-branched`; only the model inputs differ (the KV cache). The folder is written
atomically (`decoder_folder` describes it): graph, manifest, `genai_config.json`, packed adapters, tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from lora_export import contract
from lora_export.adapters.adapter import Adapter
from lora_export.adapters.layer import BranchFeed
from lora_export.artifacts.decoder_folder import (
    CONFIG_NAME,
    DECODER_KEY,
    MODEL_NAME,
    DecoderFacts,
    genai_config,
    search_defaults,
)
from lora_export.artifacts.fileio import atomic_dir, write_json
from lora_export.artifacts.onnxio import ir_initializers, write_manifest
from lora_export.contract import (
    BANK,
    BATCH_DIM,
    DECODER_LAYOUTS,
    DENSE,
    MERGED,
    PAST_SEQUENCE_DIM,
    SEQUENCE_DIM,
    TOTAL_SEQUENCE_DIM,
    decoder_input_names,
    decoder_kind,
    decoder_output_names,
)
from lora_export.errors import UserError
from lora_export.export import trace as trace_mod
from lora_export.export.branched import BANK_FORMULATION_KEY, check_bank_formulation, lora_wiring
from lora_export.export.decoder_result import WRITTEN, DecoderExport, copy_tokenizer, pack_folder_adapters
from lora_export.export.kv_cache import KvCacheLM, check_causal_lm, example_inputs, probe
from lora_export.export.manifest import build_manifest
from lora_export.export.merged import merged_work
from lora_export.export.stream import OnWrite, check_disk_space
from lora_export.models.loading import LoadedModel

TRACE_BATCH, TRACE_SEQ = 2, 3  # >= 2: torch.export specializes dims of size 0 and 1


def decoder_view(work: LoadedModel, facts: DecoderFacts, dtype) -> LoadedModel:
    """`work` (LoRA already merged or wired) as the traceable `KvCacheLM`, with the decoder's I/O and dims."""
    inputs = decoder_input_names(facts.num_layers)
    outputs = decoder_output_names(facts.num_layers)
    seq_axes = {0: BATCH_DIM, 1: SEQUENCE_DIM}
    axes = {inputs[0]: seq_axes, inputs[1]: {0: BATCH_DIM, 1: TOTAL_SEQUENCE_DIM}, inputs[2]: seq_axes}
    axes.update({n: {0: BATCH_DIM, 2: PAST_SEQUENCE_DIM} for n in inputs[3:]})
    axes[outputs[0]] = seq_axes
    axes.update({n: {0: BATCH_DIM, 2: TOTAL_SEQUENCE_DIM} for n in outputs[1:]})
    return LoadedModel(
        module=KvCacheLM(work.module, facts.num_layers).eval(),
        arch="py",  # positional forward: `call_model` passes the inputs in order
        source=work.source,
        input_names=inputs,
        output_names=outputs,
        dynamic_axes=axes,
        make_inputs=lambda b, s, seed: example_inputs(facts, dtype, b, s, seed),
        default_seq=TRACE_SEQ,
    )


def export_decoder(
    loaded: LoadedModel,
    out: str | Path,
    *,
    adapters: list[Adapter] = (),
    layout: str = MERGED,
    targets: list[str] | str | None = None,
    max_rank: int | None = None,
    dtype: str = "fp32",
    opset: int | None = None,
    force: bool = False,
    bank_formulation: str = DENSE,
    on_write: OnWrite | None = None,
    fused: bool | None = None,
    precision: str = "fp32",
) -> DecoderExport:
    """Write the decoder folder `out` for `loaded` with `adapters` in `layout`. Weights are streamed as in
    `export_merged` (a weightless skeleton is traced, each weight written once when the graph is saved);
    `on_write(bytes done, total, tensor)` follows them.

    `fused`: True writes the ONNX Runtime GenAI builder's fused graph with our branches (`export.fused`) or
    refuses; None (the default) writes it where it can and falls back to the traced graph otherwise (the reason
    in `DecoderExport.note`); False traces. `precision` (fp32, int4, int8) is the fused graph's base weights."""
    out = Path(out)
    adapters = list(adapters)
    check_causal_lm(loaded.module, loaded.arch, loaded.source)
    _check_request(out, adapters, layout, force)
    check_bank_formulation(layout, bank_formulation)
    torch_dtype = contract.torch_dtype(dtype)
    facts = probe(loaded.module, loaded.source)
    note = None
    if fused is not False:
        from lora_export.export.fused import export_fused_decoder, fused_refusal

        why = "dtype fp16 is written by the traced path only" if dtype != "fp32" else None
        why = why or fused_refusal(loaded, adapters, layout)
        if why is None:
            return export_fused_decoder(
                loaded,
                out,
                facts,
                adapters=adapters,
                layout=layout,
                targets=targets,
                precision=precision,
                max_rank=max_rank,
                force=force,
            )
        if fused:
            raise UserError(f"--fused cannot be written: {why}; export without --fused for the traced graph")
        note = f"traced (unfused) graph: {why}"
    if precision != "fp32":
        raise UserError(f"--precision {precision} is the fused graph's; for the traced graph use optimize --quantize")
    wiring, feed = None, None
    if layout == MERGED:
        work, plan = merged_work(loaded, adapters[0] if adapters else None, torch_dtype)
    else:
        wiring = lora_wiring(loaded, adapters, targets, layout, max_rank, dtype, TRACE_BATCH)
        work, plan = wiring.work(loaded, torch_dtype)
    if plan is not None:
        lora_bytes = wiring.default_bytes() if wiring is not None else 0
        check_disk_space(out / MODEL_NAME, plan.weight_bytes(work.module) + lora_bytes)
    if wiring is not None:
        feed = BranchFeed(layout, bank_formulation)
        wiring.attach(work.module, feed)
    extra, table = (wiring.extra, wiring.table) if wiring is not None else ([], None)
    view = decoder_view(work, facts, torch_dtype)
    model = trace_mod.trace(
        view, extra=extra, feed=feed, batch=TRACE_BATCH, seq=TRACE_SEQ, opset=opset, dtype=torch_dtype, weights=plan
    )
    if table is not None:
        wiring.finish(work.module, model, prefix="model.")  # KvCacheLM holds the model as `model`
        table.base = ir_initializers(model)  # DoRA scales of the packed adapters read base weights
    manifest = build_manifest(decoder_kind(layout), view, model, adapters=adapters, dtype=dtype, slots=table)
    manifest.model = {"source": loaded.source, "arch": loaded.arch}
    manifest.extra[DECODER_KEY] = facts.to_dict()
    if layout == BANK:
        manifest.extra[BANK_FORMULATION_KEY] = bank_formulation
    search = search_defaults(getattr(loaded.module, "generation_config", None))
    packed: dict[str, Path] = {}
    with atomic_dir(out, replaceable=WRITTEN if force else ()) as tmp:
        trace_mod.save(model, tmp / MODEL_NAME, on_write=on_write)
        write_manifest(tmp / MODEL_NAME, manifest)
        write_json(tmp / CONFIG_NAME, genai_config(facts, MODEL_NAME, search))
        copy_tokenizer(loaded.extra.get("model_dir", loaded.source), tmp)
        if layout != MERGED:
            packed = pack_folder_adapters(table, adapters, tmp, out)
    return DecoderExport(out, manifest, facts, packed, note)


def _check_request(out: Path, adapters: list[Adapter], layout: str, force: bool) -> None:
    if layout not in DECODER_LAYOUTS:
        raise UserError(f"unknown layout {layout!r}: choose {', '.join(DECODER_LAYOUTS)}")
    if layout == MERGED and len(adapters) > 1:
        raise UserError(
            f"layout merged folds one adapter, got {len(adapters)}: give one --adapter, or use --layout inputs|bank"
        )
    names = [a.name for a in adapters]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"two adapters are named {dupes[0]!r}: adapters in a folder need distinct directory names")
    if out.exists() and not force:
        raise UserError(f"{out} already exists: pass --force to overwrite it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: give a folder path")
