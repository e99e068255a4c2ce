"""Branched export: the LoRA side branch stays in the graph, its tensors are graph inputs.

Layout `inputs` (names from `lora_export.contract`): for each adapted module P, inputs `weight_names(P)`,
A `[in, r_k]` and B `[r_k, out]` (scaling folded into B), each backed by a same-name `[in, 0]` / `[0, out]`
initializer, so a run without adapter tensors is the base model. One symbolic rank per module (`r_k`) so
adapters with per-module ranks (PEFT's rank_pattern) fit.

Layout `bank`: one graph for a batch whose rows use different adapters. Inputs `ADAPTER_INDEX` `[batch]`
(int64, `NO_ADAPTER` = -1 = no adapter) and per module `bank_names(P)`, A `[N, in, R]`, B `[N, R, out]`
(N symbolic, R = max rank, smaller ranks zero-padded). The branch is dense: the N adapters' A
concatenated along r, a per-row mask keeps only the row's own rank slots, one matmul with the
concatenated B. This is the formulation that stayed within +5-15% of a single branch on an H200,
where per-row gather + batched matmul was 2.6-40x slower.

Embedding slots (LoRA on `nn.Embedding`) take the same A/B names; the branch gathers A's rows by token id.
DoRA (`dora=True`, or any DoRA adapter given): each slot also takes `dora_name(P)` `[out]` (bank: `[N, out]`),
default ones, and computes `g * (W0·x + B·A·x) + bias`. `modules_to_save` (the adapters' saved modules, or
`saved_modules`): each parameter p of module M becomes the input `saved_name(M, p)` with the base value as its
default (bank: `[N, *shape]`, rows gathered per adapter, -1 = the base value).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lora_export import contract
from lora_export.adapters.adapter import Adapter
from lora_export.adapters.inject import attach_feed, check_fits, clean_path, find_targets, unwrap
from lora_export.adapters.layer import BranchFeed, is_conv1d, layer_dims, stores_in_out
from lora_export.adapters.saved import base_layers_changed, wrap_saved
from lora_export.adapters.spec import LoraSpec, default_targets
from lora_export.adapters.ties import untie
from lora_export.artifacts.fileio import all_or_nothing, check_output_path
from lora_export.artifacts.onnxio import write_manifest
from lora_export.contract import (
    ADAPTER_INDEX,
    BANK,
    BANK_FORMULATIONS,
    BANK_KIND,
    CONV1D,
    DENSE,
    EMBEDDING,
    IN_OUT,
    INPUTS,
    LINEAR,
    NUM_ADAPTERS_DIM,
    OUT_IN,
    SLOTS_METADATA,
    SavedParam,
    Slot,
    SlotTable,
    bank_names,
    dora_name,
    rank_dim,
    saved_name,
    weight_names,
)
from lora_export.errors import AdapterError, UserError, named
from lora_export.export import trace as trace_mod
from lora_export.export.manifest import build_manifest
from lora_export.export.merged import ExportResult
from lora_export.export.stream import OnWrite, StreamPlan, check_disk_space, export_skeleton, plan_untie
from lora_export.models.loading import LoadedModel

EXAMPLE_RANK = 2  # torch.export specializes dims of size 0 and 1; the rank stays symbolic in the graph


def resolve_targets(loaded: LoadedModel, adapters: list[Adapter], targets: list[str] | str | None) -> list[str]:
    """Modules that get a branch: the union of the adapters' modules, else `targets`, else arch defaults."""
    if adapters and targets is not None:
        raise UserError("give --adapter or --targets, not both: with adapters, their modules are the LoRA slots")
    if adapters:
        modules = unwrap(loaded.module)
        for a in adapters:
            check_fits(loaded.module, a)
            if any(m.is_conv for m in a.modules.values()):
                raise AdapterError(
                    f"{named('adapter', a.name)} adapts Conv2d layers; branched export supports "
                    "Linear/Conv1D/Embedding only"
                )
            changed = base_layers_changed(modules, a)
            if changed:
                raise AdapterError(
                    f"{named('adapter', a.name)} saves base weights for {', '.join(changed[:2])} "
                    "(save_embedding_layers) that "
                    "differ from the model's; branched graphs swap LoRA tensors and modules_to_save, not base "
                    "weights: use merge-and-export, or export a base model that holds these weights"
                )
        return sorted({p for a in adapters for p in a.modules})
    if targets is None:
        targets = default_targets(loaded.arch, "pass --adapter DIR or --targets NAMES", loaded.module)
    paths = sorted(find_targets(loaded.module, LoraSpec(target_modules=targets)))
    modules = unwrap(loaded.module)
    convs = [p for p in paths if isinstance(modules[p], torch.nn.Conv2d)]
    if convs:
        raise UserError(
            f"{', '.join(convs[:3])} {'is a Conv2d' if len(convs) == 1 else 'are Conv2d'}: branched export supports "
            "Linear/Conv1D targets; use merge-and-export for Conv2d adapters"
        )
    return paths


def lora_slots(loaded: LoadedModel, paths: list[str], layout: str = INPUTS, dora: bool = False) -> list[Slot]:
    """One slot per module path, in order; inputs-layout slots carry their symbolic rank dim (`r_k`)."""
    modules = unwrap(loaded.module)
    slots = []
    for k, p in enumerate(paths):
        m = modules[p]
        d_in, d_out = layer_dims(m)
        kind = EMBEDDING if isinstance(m, torch.nn.Embedding) else CONV1D if is_conv1d(m) else LINEAR
        slots.append(
            Slot(
                p,
                d_in,
                d_out,
                rank_dim(k) if layout == INPUTS else None,
                dora=dora,
                kind=kind,
                weight=f"{p}.weight",
                layout=IN_OUT if stores_in_out(m) else OUT_IN,
            )
        )
    return slots


def _initializer_of(module: torch.nn.Module, path: str, model, prefix: str = "") -> str | None:
    """The graph initializer holding module `path`'s base weight: `P.weight`, or the name the exporter kept for a
    weight tied to another layer (GPT-2's `wte` is saved as `lm_head.weight`)."""
    weight = unwrap(module)[path].weight
    names = [clean_path(n) for n, p in module.named_parameters(remove_duplicate=False) if p is weight]
    candidates = [prefix + n for n in [f"{path}.weight", *names]]
    return next((n for n in candidates if n in model.graph.initializers), None)


def saved_params(loaded: LoadedModel, adapters: list[Adapter], names: list[str] | None) -> list[SavedParam]:
    """`modules_to_save` parameters the graph takes: every parameter of each module the adapters save, or of
    the modules `names` (PEFT's matching: a module path ending in the name)."""
    modules = unwrap(loaded.module)
    paths = {p for a in adapters for p in a.saved}
    for n in names or []:
        found = [p for p in modules if p == n or p.endswith(f".{n}")]
        if not found:
            raise UserError(f"--modules-to-save {n}: the model has no module of that name")
        paths.update(found)
    out = []
    for path in sorted(paths):
        for param, value in modules[path].named_parameters():
            out.append(SavedParam(path, param.replace("base_layer.", ""), tuple(value.shape)))
    return out


def _saved_layout(
    loaded: LoadedModel, params: list[SavedParam], layout: str, dtype: torch.dtype
) -> list[trace_mod.ExtraInput]:
    g = torch.Generator().manual_seed(1)
    base = {f"{p}.{n}": v for p, m in unwrap(loaded.module).items() for n, v in m.named_parameters(recurse=False)}
    extra = []
    for sp in params:
        value = base[sp.base_name].detach().to(dtype)
        if layout == INPUTS:
            extra.append(trace_mod.ExtraInput(saved_name(sp.module, sp.param), value.clone(), default=value.clone()))
        else:
            extra.append(
                trace_mod.ExtraInput(
                    saved_name(sp.module, sp.param, BANK_KIND),
                    torch.randn(2, *sp.shape, generator=g).to(dtype),
                    {0: NUM_ADAPTERS_DIM},
                    default=torch.zeros(0, *sp.shape, dtype=dtype),
                )
            )
    return extra


def _dora_layout(slots: list[Slot], layout: str, dtype: torch.dtype) -> list[trace_mod.ExtraInput]:
    g = torch.Generator().manual_seed(2)
    extra = []
    for s in slots:
        if layout == INPUTS:
            example = 1 + 0.1 * torch.randn(s.out_features, generator=g)
            default = torch.ones(s.out_features)
            extra.append(trace_mod.ExtraInput(dora_name(s.path), example.to(dtype), default=default.to(dtype)))
        else:
            example = 1 + 0.1 * torch.randn(2, s.out_features, generator=g)
            default = torch.ones(0, s.out_features)
            extra.append(
                trace_mod.ExtraInput(
                    dora_name(s.path, BANK_KIND), example.to(dtype), {0: NUM_ADAPTERS_DIM}, default=default.to(dtype)
                )
            )
    return extra


def _inputs_layout(slots: list[Slot], dtype: torch.dtype) -> list[trace_mod.ExtraInput]:
    g = torch.Generator().manual_seed(0)
    extra = []
    for s in slots:
        a_name, b_name = weight_names(s.path)
        r = s.rank_dim
        extra.append(
            trace_mod.ExtraInput(
                a_name,
                torch.randn(s.in_features, EXAMPLE_RANK, generator=g).to(dtype),
                {1: r},
                default=torch.zeros(s.in_features, 0, dtype=dtype),
            )
        )
        extra.append(
            trace_mod.ExtraInput(
                b_name,
                torch.randn(EXAMPLE_RANK, s.out_features, generator=g).to(dtype),
                {0: r},
                default=torch.zeros(0, s.out_features, dtype=dtype),
            )
        )
    return extra


def _bank_layout(slots: list[Slot], max_rank: int, batch: int, dtype: torch.dtype) -> list[trace_mod.ExtraInput]:
    g = torch.Generator().manual_seed(0)
    n = 2
    extra = [trace_mod.ExtraInput(ADAPTER_INDEX, torch.arange(batch, dtype=torch.int64) % n, {0: "batch"})]
    for s in slots:
        a_name, b_name = bank_names(s.path)
        extra.append(
            trace_mod.ExtraInput(
                a_name,
                torch.randn(n, s.in_features, max_rank, generator=g).to(dtype),
                {0: NUM_ADAPTERS_DIM},
                default=torch.zeros(0, s.in_features, max_rank, dtype=dtype),
            )
        )
        extra.append(
            trace_mod.ExtraInput(
                b_name,
                torch.randn(n, max_rank, s.out_features, generator=g).to(dtype),
                {0: NUM_ADAPTERS_DIM},
                default=torch.zeros(0, max_rank, s.out_features, dtype=dtype),
            )
        )
    return extra


def bank_rank(adapters: list[Adapter], max_rank: int | None) -> int:
    """A bank's R: `max_rank`, by default the adapters' highest rank and at least 16; an adapter above it is refused."""
    top = max((m.r for a in adapters for m in a.modules.values()), default=0)
    rank = max_rank or max(top, 16)
    if top > rank:
        raise UserError(f"an adapter has rank {top}, above --max-rank {rank}: raise --max-rank")
    return rank


@dataclass
class Wiring:
    """A branched layout, ready to trace: the extra graph inputs, the modules they feed, the slot table."""

    extra: list[trace_mod.ExtraInput]
    paths: list[str]
    table: SlotTable

    def work(self, loaded: LoadedModel, dtype: torch.dtype) -> tuple[LoadedModel, StreamPlan | None]:
        """What this layout traces: a weightless skeleton (each slot's base weight untied in the plan, so bake and
        refit change only that layer) and the plan streaming its weights; or, when `modules_to_save` defaults are
        the model's values, a private copy of the loaded weights (plan None)."""
        if self.table.saved:
            work = loaded.materialized().copy(dtype=dtype)
            self._saved_values_from(work.module)
            return work, None
        work, plan = export_skeleton(loaded, dtype)
        plan_untie(work, plan, self.paths)
        return work, plan

    def _saved_values_from(self, module: torch.nn.Module) -> None:
        """The `modules_to_save` inputs of a lazily loaded model were laid out from its weightless skeleton (meta
        tensors): their example and default values come from the loaded weights instead."""
        base = {f"{p}.{n}": v for p, m in unwrap(module).items() for n, v in m.named_parameters(recurse=False)}
        names = {saved_name(sp.module, sp.param): sp.base_name for sp in self.table.saved.values()}
        for i, e in enumerate(self.extra):
            if e.name in names and (e.example.is_meta or (e.default is not None and e.default.is_meta)):
                value = base[names[e.name]].detach()
                self.extra[i] = replace(e, example=value.clone(), default=value.clone())

    def default_bytes(self) -> int:
        """Bytes of the extra inputs' default initializers (the graph stores them besides the weights)."""
        return sum(e.default.numel() * e.default.element_size() for e in self.extra if e.default is not None)

    def attach(self, module: torch.nn.Module, feed: BranchFeed) -> None:
        """Route `module`'s LoRA branches and `modules_to_save` parameters through `feed` (the graph inputs). A
        slot's base weight becomes its own first (untied), so bake and refit change only that layer."""
        modules = unwrap(module)
        untie(module, [(p, modules[p]) for p in self.paths])
        attach_feed(module, self.paths, feed)
        saved = list(self.table.saved.values())
        for path, wrapper in wrap_saved(module, sorted({sp.module for sp in saved})).items():
            wrapper.feed, wrapper.names = feed, [sp.param for sp in saved if sp.module == path]

    def finish(self, module: torch.nn.Module, model, prefix: str = "") -> None:
        """After the trace: find each slot's base-weight initializer and record what DoRA scales and embedding
        checks need (`SLOTS_METADATA`) in graphs that have such slots. `prefix`: what the traced wrapper puts
        before `module`'s parameter names (a decoder's `model.`)."""
        slots = [replace(s, weight=_initializer_of(module, s.path, model, prefix)) for s in self.table.slots.values()]
        self.table.slots = {s.path: s for s in slots}
        if any(s.dora or s.kind == EMBEDDING for s in slots):
            model.metadata_props[SLOTS_METADATA] = json.dumps({s.path: s.metadata() for s in slots}, sort_keys=True)


BANK_FORMULATION_KEY = "bank_formulation"  # the manifest's record of how a bank graph computes its rows


def check_bank_formulation(layout: str, formulation: str) -> None:
    if formulation not in BANK_FORMULATIONS:
        raise UserError(f"unknown bank formulation {formulation!r}: choose {' or '.join(BANK_FORMULATIONS)}")
    if formulation != DENSE and layout != BANK:
        raise UserError(f"--bank-formulation {formulation} is for --layout bank, not {layout}")


def lora_wiring(
    loaded: LoadedModel,
    adapters: list[Adapter],
    targets: list[str] | str | None,
    layout: str,
    max_rank: int | None,
    dtype: str,
    batch: int,
    *,
    dora: bool = False,
    saved_modules: list[str] | None = None,
) -> Wiring:
    """The LoRA inputs of a branched layout (`inputs` or `bank`) for `loaded` (shared by every branched export).
    `dora` adds DoRA scale inputs (automatic when an adapter uses DoRA); `saved_modules` names modules_to_save
    modules to expose besides the adapters' own."""
    paths = resolve_targets(loaded, adapters, targets)
    dora = dora or any(a.is_dora for a in adapters)
    slots = lora_slots(loaded, paths, layout, dora)
    saved = saved_params(loaded, adapters, saved_modules)
    torch_dtype = contract.torch_dtype(dtype)
    if layout == INPUTS:
        extra = _inputs_layout(slots, torch_dtype)
    elif layout == BANK:
        max_rank = bank_rank(adapters, max_rank)
        extra = _bank_layout(slots, max_rank, max(batch, 2), torch_dtype)
    else:
        raise UserError(f"unknown layout {layout!r}: choose inputs or bank")
    if dora:
        extra += _dora_layout(slots, layout, torch_dtype)
    extra += _saved_layout(loaded, saved, layout, torch_dtype)
    table = SlotTable(layout, {s.path: s for s in slots}, max_rank or 0, dtype, {sp.base_name: sp for sp in saved})
    return Wiring(extra, paths, table)


def export_branched(
    loaded: LoadedModel,
    out: str | Path,
    *,
    adapters: list[Adapter] = (),
    targets: list[str] | str | None = None,
    layout: str = INPUTS,
    max_rank: int | None = None,
    opset: int | None = None,
    dtype: str = "fp32",
    force: bool = False,
    batch: int = 2,
    seq: int = 16,
    dora: bool = False,
    saved_modules: list[str] | None = None,
    bank_formulation: str = DENSE,
    on_write: OnWrite | None = None,
) -> ExportResult:
    """Export with LoRA slots for `adapters`' modules (or `targets`); weights streamed as in `export_merged`.
    `bank_formulation` (bank layout): `dense` or `gather` (`contract.BANK_FORMULATIONS`)."""
    adapters = list(adapters)
    check_bank_formulation(layout, bank_formulation)
    wiring = lora_wiring(
        loaded, adapters, targets, layout, max_rank, dtype, batch, dora=dora, saved_modules=saved_modules
    )
    torch_dtype = contract.torch_dtype(dtype)
    work, plan = wiring.work(loaded, torch_dtype)
    if plan is not None:
        check_disk_space(Path(out), plan.weight_bytes(work.module) + wiring.default_bytes())
    out = check_output_path(out, force)
    feed = BranchFeed(layout, bank_formulation)
    wiring.attach(work.module, feed)
    model = trace_mod.trace(
        work, extra=wiring.extra, feed=feed, batch=max(batch, 2), seq=seq, opset=opset, dtype=torch_dtype, weights=plan
    )
    wiring.finish(work.module, model)
    manifest = build_manifest(f"branched-{layout}", loaded, model, adapters=adapters, dtype=dtype, slots=wiring.table)
    if layout == BANK:
        manifest.extra[BANK_FORMULATION_KEY] = bank_formulation
    with all_or_nothing() as files:  # the graph and its manifest, or neither
        files += trace_mod.save(model, out, on_write=on_write)
        write_manifest(out, manifest)
    return ExportResult(path=out, manifest=manifest, files=files)
