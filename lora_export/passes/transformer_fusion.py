"""`TransformerFusionPass`: attention, normalization, rotary and GELU fusions for ONNX Runtime, LoRA-safe.

Built on onnxscript's `rewriter.ort_fusions` (the fusion library written for dynamo exports), with the parts
of its `optimize_for_ort` driver that break our graphs replaced:

- its constant folding would fold `Transpose(W)` into anonymous `val_N` tensors: here folding never touches
  a node that reads a base weight or a LoRA input (`export.trace.optimize_preserving`);
- its last step removes initializers from the graph inputs, which deletes every LoRA input's rank-0
  default: not done here;
- its MultiHeadAttention rule breaks GPT-2 graphs (see `fusion_rules.MultiHeadAttentionKeepShape`);
- every rule runs `guarded`: a match that would absorb a LoRA branch node or its joining Add is refused.

Fusions, by group (`FUSION_GROUPS`; each group is applied as a whole, or rolled back when it leaves the
graph invalid or breaks the LoRA contract, with the reason in `notes`):

- `norm`: SimplifiedLayerNormalization (RMSNorm), SkipLayerNormalization, SkipSimplifiedLayerNormalization;
- `rotary`: RotaryEmbedding (full and partial), cos/sin caches;
- `attention`: scaled dot-product attention -> MultiHeadAttention (with past/present for KV-cache decoders),
  its scale and bias; GroupQueryAttention where onnxscript's GQA pattern matches; the packed-QKV
  `Attention` op only with `packed_attention=True` (it reads `Concat(Wq, Wk, Wv)`, which ONNX Runtime folds
  at session start, so the weight names survive);
- `gelu`: erf GELU -> Gelu, tanh GELU (both operand orders) -> FastGelu, bias + GELU -> BiasGelu,
  SiLU -> QuickGelu(alpha=1).

`counts` maps each fusion to how many times it fired (what `optimize --report` prints). The result uses
`com.microsoft` ops: ONNX Runtime only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from lora_export.passes import fusion_rules
from lora_export.passes.contract import (
    ContractError,
    LoraPass,
    check_preserved,
    lora_region,
    protected_names,
    snapshot,
)

FUSION_GROUPS = ("norm", "rotary", "attention", "gelu")
PRIVATE_DOMAIN = "ai.onnxruntime._fusion"  # onnxscript's intermediate ops (SDPA): never left in a result


def _rule_sets() -> dict[str, list[tuple[str, Callable[[], object], bool]]]:
    """group -> [(fusion name, () -> rule set, shape inference after)], in onnxscript's `fuse_xformers` order."""
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter.ort_fusions import (
        attention,
        bias_gelu,
        cos_sin_cache,
        erfgelu,
        gelu,
        mha_bias,
        mha_scale,
        rms_normalization,
        rotary_embedding,
        sdpa,
        sdpa_via_mha,
        skip_normalization,
    )

    return {
        "norm": [
            ("RMSNormalization", lambda: rms_normalization.rms_normalization_ruleset, False),
            ("SkipLayerNormalization", lambda: skip_normalization.skip_layer_normalization_ruleset, False),
            ("SkipSimplifiedLayerNormalization", lambda: skip_normalization.skip_rms_normalization_ruleset, False),
        ],
        "rotary": [
            ("RotaryEmbedding", lambda: rotary_embedding.rotary_embedding_rules, False),
            ("CosSinCache", lambda: cos_sin_cache.cos_sin_cache_rules, False),
            ("CosSinCache (positions)", lambda: fusion_rules.cos_sin_cache_rules, False),
            ("PartialRotaryEmbedding", lambda: rotary_embedding.partial_embedding_rules, False),
        ],
        "attention": [
            ("SDPA", lambda: sdpa.sdpa_rules, True),
            ("MultiHeadAttention with past", lambda: fusion_rules.mha_rules_with_past, False),
            ("MultiHeadAttention", lambda: fusion_rules.mha_rules_no_past, False),
            ("MultiHeadAttention scale", lambda: mha_scale._mha_scale_rules, False),
            ("MultiHeadAttention bias", lambda: mha_bias.mha_bias_rules, False),
            ("Attention (packed QKV)", lambda: attention.attention_rules, False),
            ("MultiHeadAttention from SDPA", lambda: sdpa_via_mha._rules, False),
        ],
        "gelu": [
            ("Gelu (erf)", lambda: erfgelu.rules, False),
            ("FastGelu (tanh)", lambda: pattern.RewriteRuleSet(list(gelu.gelu_rules), commute=True), False),
            ("FastGelu (tanh, GPT-2 order)", lambda: fusion_rules.gelu_tanh_half_first_rules, False),
            ("BiasGelu", lambda: bias_gelu.bias_gelu_rules, False),
            ("QuickGelu (SiLU)", lambda: fusion_rules.silu_rules, False),
        ],
    }


def guarded_nodes(model: ir.Model) -> set[ir.Node]:
    """LoRA branch nodes and the Add/Sub nodes that join a branch to its base output."""
    region = lora_region(model)
    joins = {
        user
        for node in region
        for out in node.outputs
        for user, _ in out.uses()
        if user not in region and user.op_type in ("Add", "Sub")
    }
    return region | joins


def parse_fusions(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """`"all"`/None -> every group; `"none"` -> none; else a comma list of group names (checked)."""
    from lora_export.errors import UserError

    if spec is None or spec == "all":
        return FUSION_GROUPS
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if items == ["none"]:
        return ()
    bad = [s for s in items if s not in FUSION_GROUPS]
    if bad:
        raise UserError(f"unknown fusion {bad[0]!r}: choose from {', '.join(FUSION_GROUPS)}, all or none")
    return tuple(g for g in FUSION_GROUPS if g in items)


class TransformerFusionPass(LoraPass, ir.passes.FunctionalPass):
    """See the module docstring. `groups`: which fusion groups run (default all)."""

    def __init__(self, groups: Sequence[str] = FUSION_GROUPS, *, packed_attention: bool = False):
        super().__init__()
        self.groups = tuple(groups)
        self.packed_attention = packed_attention
        self.counts: dict[str, int] = {}
        self.notes: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.counts, self.notes = {}, []
        if not self.groups:
            return ir.passes.PassResult(model, modified=False)
        before = snapshot(model)
        model = model.clone()  # tensors are shared; the input model is left as it was
        _prepare(model)
        rule_sets = _rule_sets()
        for group in self.groups:
            saved = model.clone()
            counts: dict[str, int] = {}
            for name, get_rules, infer in rule_sets[group]:
                if name.startswith("Attention (packed") and not self.packed_attention:
                    continue
                counts[name] = _apply(model, get_rules())
                if infer and counts[name]:
                    common_passes.ShapeInferencePass(strict_mode=False)(model)
            why = _invalid(model, before)
            if why:
                model = saved
                self.notes.append(f"fusion group {group!r} rolled back: {why}")
                counts = dict.fromkeys(counts, 0)
            self.counts.update(counts)
        _finish(model)
        fired = {k: v for k, v in self.counts.items() if v}
        self.notes.append(
            "fused: " + (", ".join(f"{k} x{v}" for k, v in fired.items()) if fired else "nothing matched")
        )
        return ir.passes.PassResult(model, modified=bool(fired))


def _apply(model: ir.Model, rules) -> int:
    return fusion_rules.guarded(rules, guarded_nodes(model)).apply_to_model(model)


def _prepare(model: ir.Model) -> None:
    """onnxscript's `_pre_optimize`, with name-preserving folding: shapes known, shape arithmetic folded."""
    from onnxscript.rewriter.ort_fusions import shape_optimization

    from lora_export.export.trace import optimize_preserving

    common_passes.ShapeInferencePass(strict_mode=False)(model)
    optimize_preserving(model, protected_names(model))
    shape_optimization.rules.apply_to_model(model)
    optimize_preserving(model, protected_names(model))


def _finish(model: ir.Model) -> None:
    from lora_export.export.trace import optimize_preserving

    common_passes.InlinePass()(model)  # fusion functions no later fusion consumed
    optimize_preserving(model, protected_names(model))
    common_passes.ShapeInferencePass(strict_mode=False)(model)


def _invalid(model: ir.Model, before) -> str:
    left = sorted({n.op_type for n in model.graph if n.domain == PRIVATE_DOMAIN})
    if left:
        return f"intermediate op(s) {', '.join(left)} left unfused"
    try:
        check_preserved(before, model)
    except ContractError as e:
        return f"it would break the LoRA contract ({e})"
    return ""
