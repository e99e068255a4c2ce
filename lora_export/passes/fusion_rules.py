"""Rewrite rules for the transformer fusions, on top of onnxscript's `rewriter.ort_fusions`.

- `guarded(rules, protected)`: the same rules, but a match that would remove or replace a protected node
  (a LoRA branch node, or the Add that joins a branch to its base output) is refused, so branch MatMuls
  stay visible and addressable after every fusion.
- `MultiHeadAttentionKeepShape`: onnxscript's MultiHeadAttention rule, fixed for graphs where the attention
  output Reshape goes straight to rank 2. transformers' GPT-2 `Conv1D` calls `x.view(-1, d)` right after
  `attn_output.reshape(b, s, d)`, and the exporter collapses the two reshapes into one `(B*S, D)` Reshape that
  feeds a `Gemm`. The upstream rule replaces that Reshape's output by MultiHeadAttention's `(B, S, D)`, so the
  Gemm gets a rank-3 input and ONNX Runtime refuses the graph ("Gemm ... Input 0 expected to have rank 2
  but has rank 3"). Here the matched Reshape is re-applied to the fused output when it was not `(B, S, D)`.
- `GeluTanhHalfFirst`: GPT-2's `NewGELUActivation` writes `(0.5 * x) * (1 + tanh(...))`; onnxscript's tanh
  GELU pattern only knows `x * (0.5 * (1 + tanh(...)))`. Both become `com.microsoft.FastGelu`.
- `SiluToQuickGelu`: `x * Sigmoid(x)` (SiLU, Llama/Qwen2 MLPs) becomes `com.microsoft.QuickGelu(alpha=1)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions import mha

_SQRT_TWO_OVER_PI = math.sqrt(2.0 / math.pi)


class _GuardedRule:
    """A rewrite rule that refuses matches touching `protected` nodes (duck-types `RewriteRule`)."""

    def __init__(self, rule, protected: set[ir.Node]):
        self._rule = rule
        self._protected = protected

    def __getattr__(self, name):
        return getattr(self._rule, name)

    def commute(self):
        return [_GuardedRule(r, self._protected) for r in self._rule.commute()]

    def try_rewrite(self, model, graph_or_function, node, **kwargs):
        delta = self._rule.try_rewrite(model, graph_or_function, node, **kwargs)
        if delta is not None and any(n in self._protected for n in delta.match.nodes):
            for new in delta.new_nodes:  # built but never inserted: let go of the graph values they read
                for i in range(len(new.inputs)):
                    new.replace_input_with(i, None)
            return None
        return delta


def guarded(rules: Iterable, protected: set[ir.Node], *, commute: bool = False) -> pattern.RewriteRuleSet:
    """`rules` (a RewriteRuleSet or rules) as a set whose matches never include a node of `protected`."""
    return pattern.RewriteRuleSet([_GuardedRule(r, protected) for r in rules], commute=commute)


class MultiHeadAttentionKeepShape(mha.MultiHeadAttention):
    """onnxscript's MultiHeadAttention rule; the output keeps the shape of the Reshape it replaces."""

    def rewrite(self, op, attention_reshaped=None, **kwargs):
        out = super().rewrite(op, **kwargs)
        if out is None or attention_reshaped is None:
            return out
        shape = attention_reshaped.shape
        query = kwargs.get("query_BSD")
        if shape is not None and query is not None and query.shape is not None and shape.rank() == 3:
            if shape[0] == query.shape[0] and shape[1] == query.shape[1]:
                return out  # already (B, S, D)
        target = attention_reshaped.producer().inputs[1]  # the matched Reshape's own target shape
        if isinstance(out, tuple | list):
            return (op.Reshape(out[0], target), *out[1:])
        return op.Reshape(out, target)


def _mha_rules(has_past_present: bool) -> pattern.RewriteRuleSet:
    rules = []
    for is_rotary in (False, True):
        for cross in (False,) if has_past_present else (False, True):
            name = "MHA" + ("_Rotary" if is_rotary else "") + ("_Past" if has_past_present else "")
            name += "_CrossAttention" if cross else ""
            rules.append(
                MultiHeadAttentionKeepShape.rule(
                    name, is_rotary=is_rotary, has_past_present=has_past_present, is_cross_attention=cross
                )
            )
    return pattern.RewriteRuleSet(rules)


mha_rules_with_past = _mha_rules(True)
mha_rules_no_past = _mha_rules(False)


class GeluTanhHalfFirst(pattern.RewriteRuleClassBase):
    """`(0.5 * x) * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))` -> `FastGelu(x)`."""

    def pattern(self, op, x):
        inner = op.Add(x, op.Mul(op.Pow(x, 3.0), 0.044715))
        t = op.Tanh(op.Mul(inner, _SQRT_TWO_OVER_PI))
        return op.Mul(op.Mul(x, 0.5), op.Add(t, 1.0))

    def rewrite(self, op, x):
        return op.FastGelu(x, _domain="com.microsoft")


class SiluToQuickGelu(pattern.RewriteRuleClassBase):
    """`x * Sigmoid(x)` -> `QuickGelu(x, alpha=1)` (ONNX Runtime's x * sigmoid(alpha * x))."""

    def pattern(self, op, x):
        return op.Mul(x, op.Sigmoid(x))

    def rewrite(self, op, x):
        return op.QuickGelu(x, alpha=1.0, _domain="com.microsoft")


gelu_tanh_half_first_rules = pattern.RewriteRuleSet([GeluTanhHalfFirst.rule()], commute=True)
silu_rules = pattern.RewriteRuleSet([SiluToQuickGelu.rule()], commute=True)


class CosSinCacheFromPositions(pattern.RewriteRuleClassBase):
    """onnxscript's fused (private-domain) RotaryEmbedding whose cos/sin come from
    `Cast(Unsqueeze(positions)) * inv_freq` -> `com.microsoft.RotaryEmbedding(x, position_ids, cos_cache,
    sin_cache)`.

    The exporter rewrites transformers' `inv_freq[None, :, None] @ position_ids[:, None, :]` into this
    broadcast `Mul`, which onnxscript's cos/sin cache rule (written for the MatMul form) does not match.
    `positions` is `[S]` (positions computed in the graph) or `[B, S]` (a `position_ids` input); the caches
    cover positions `0 .. max(positions)`, computed in the graph, once for all layers.
    """

    def __init__(self):
        super().__init__("CosSinCacheFromPositions", remove_nodes=False)  # cos/sin are shared by all layers
        self._cache: dict[tuple[int, int], tuple] = {}

    def cleanup(self):
        self._cache.clear()

    def pattern(self, op, x, positions, axes, inv_freq, interleaved, num_heads):
        pos = op.Cast(op.Unsqueeze(positions, axes), to=ir.DataType.FLOAT)
        freqs = op.Mul(pos, inv_freq)
        emb = op.Concat(freqs, freqs, axis=-1)
        cos = op.Unsqueeze(op.Cos(emb), [1])
        sin = op.Unsqueeze(op.Sin(emb), [1])
        return op.RotaryEmbedding(
            x, cos, sin, interleaved=interleaved, num_heads=num_heads, _domain="ai.onnxruntime._fusion"
        )

    def check(self, context, x, positions, axes, inv_freq, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.shape is None or x.shape.rank() != 4 or not isinstance(x.shape[3], int):
            return result.fail("x is not (B, H, S, Dh) with a known head size", x)
        if inv_freq.const_value is None or inv_freq.shape is None or inv_freq.shape.rank() != 1:
            return result.fail("inv_freq is not a constant vector", inv_freq)
        if inv_freq.shape[0] * 2 != x.shape[3]:
            return result.fail("not a full rotation (inv_freq covers part of the head)", inv_freq)
        if axes.const_value is None or positions.shape is None:
            return result.fail("unknown positions layout", axes)
        want = {1: [0, 2], 2: [2]}.get(positions.shape.rank())
        if want is None or [int(a) for a in axes.const_value.numpy().ravel()] != want:
            return result.fail("positions are not unsqueezed to (B or 1, S, 1)", axes)
        return result

    def rewrite(self, op, x, positions, inv_freq, interleaved, num_heads, **_):
        key = (id(positions), id(inv_freq))
        if key not in self._cache:
            one = op.Constant(value_int=1)
            count = op.Add(op.ReduceMax(positions, keepdims=0), one)
            rng = op.Cast(op.Range(op.Constant(value_int=0), count, one), to=ir.DataType.FLOAT)
            angles = op.Mul(op.Unsqueeze(rng, op.Constant(value_ints=[1])), inv_freq)  # (P, Dh/2)
            pos2d = positions
            if positions.shape.rank() == 1:  # (S,) -> (B, S)
                batch = op.Shape(x, start=0, end=1)
                shape = op.Concat(batch, op.Shape(positions), axis=0)
                pos2d = op.Expand(op.Unsqueeze(positions, op.Constant(value_ints=[0])), shape)
            self._cache[key] = (pos2d, op.Cos(angles), op.Sin(angles))
        pos2d, cos, sin = self._cache[key]
        return op.RotaryEmbedding(
            x, pos2d, cos, sin, interleaved=interleaved, num_heads=num_heads, _domain="com.microsoft"
        )


cos_sin_cache_rules = pattern.RewriteRuleSet([CosSinCacheFromPositions.rule()])
