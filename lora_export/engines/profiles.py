"""Optimization-profile shapes: defaults from the export manifest's dynamic dims, overrides from `--shapes`.

`--shapes` entries are `NAME:MIN,OPT,MAX`, where NAME is either
- a graph input, and MIN/OPT/MAX are full shapes: `input_ids:1x1,1x128,8x512`; or
- a dynamic dim label from the manifest, and MIN/OPT/MAX are sizes: `batch:1,1,8`, `sequence:1,128,512`,
  `r_3:0,8,64`, or `r:0,8,64` for every LoRA rank dim (`r_0`, `r_1`, ...) at once.

LoRA rank dims (branched graphs with LoRA tensors as inputs) default to 0..64, opt 8: rank 0 is the
"no adapter" run (TensorRT supports empty tensors; a matmul over an empty dim yields zeros), 64 the
largest adapter rank the engine accepts. An engine built with LoRA tensors as weights has no rank dims.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_export.contract import NUM_ADAPTERS_DIM, is_rank_dim
from lora_export.errors import UserError

Shape = tuple[int, ...]

# (min, opt, max) per dynamic-dim label; `r` covers r_0, r_1, ...
DIM_DEFAULTS: dict[str, tuple[int, int, int]] = {
    "batch": (1, 1, 8),
    "sequence": (1, 128, 512),
    "r": (0, 8, 64),
    NUM_ADAPTERS_DIM: (1, 4, 16),
    "height": (16, 32, 224),
    "width": (16, 32, 224),
}


@dataclass(frozen=True)
class InputProfile:
    name: str
    min: Shape
    opt: Shape
    max: Shape

    def to_dict(self) -> dict:
        return {"name": self.name, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: dict) -> InputProfile:
        return cls(d["name"], tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))

    def contains(self, shape: Shape) -> bool:
        return len(shape) == len(self.min) and all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))


@dataclass(frozen=True)
class ShapeSpec:
    """One parsed `--shapes` entry: full shapes for an input, or sizes for a dim label."""

    name: str
    min: Shape
    opt: Shape
    max: Shape


def parse_shape_spec(text: str) -> ShapeSpec:
    """`input_ids:1x1,1x128,8x512` or `batch:1,1,8` -> ShapeSpec; one-line UserError otherwise."""
    name, sep, rest = text.strip().rpartition(":")
    parts = rest.split(",")
    if not sep or not name or len(parts) != 3:
        raise UserError(f"--shapes {text!r}: expected NAME:MIN,OPT,MAX, e.g. input_ids:1x1,1x128,8x512 or batch:1,1,8")
    try:
        shapes = [tuple(int(d) for d in p.strip().lower().split("x")) for p in parts]
    except ValueError:
        raise UserError(f"--shapes {text!r}: sizes must be integers (dims joined by 'x')") from None
    lo, opt, hi = shapes
    if not (len(lo) == len(opt) == len(hi)):
        raise UserError(f"--shapes {text!r}: MIN, OPT and MAX must have the same rank")
    for a, b, c in zip(lo, opt, hi):
        if a < 0 or not (a <= b <= c):
            raise UserError(f"--shapes {text!r}: need 0 <= MIN <= OPT <= MAX in every dim")
    return ShapeSpec(name, lo, opt, hi)


def _dim_range(label: str, dim_specs: dict[str, ShapeSpec], input_name: str) -> tuple[int, int, int]:
    for key in (label, "r" if is_rank_dim(label) else None):
        if key and key in dim_specs:
            s = dim_specs[key]
            if len(s.min) != 1:
                raise UserError(f"--shapes {key}: a dim label takes single sizes (MIN,OPT,MAX), not shapes")
            return s.min[0], s.opt[0], s.max[0]
    for key in (label, "r" if is_rank_dim(label) else None):
        if key and key in DIM_DEFAULTS:
            return DIM_DEFAULTS[key]
    raise UserError(
        f"no default range for dynamic dim {label!r} of input {input_name!r}: pass --shapes {label}:MIN,OPT,MAX"
    )


def resolve_profiles(inputs: list[dict], specs: list[str] | tuple[str, ...] = ()) -> list[InputProfile]:
    """One profile entry per input that has a dynamic dim.

    `inputs` are manifest entries `{"name", "dtype", "shape"}` whose shape mixes ints and dim labels.
    A spec naming an input sets its full shapes (checked against static dims); a spec naming a dim label
    sets that dim everywhere it appears; the rest come from `DIM_DEFAULTS`.
    """
    parsed = [parse_shape_spec(s) for s in specs]
    names = {i["name"] for i in inputs}
    labels = {d for i in inputs for d in i["shape"] if isinstance(d, str)}
    labels_or_rank = labels | ({"r"} if any(is_rank_dim(d) for d in labels) else set())
    by_input = {s.name: s for s in parsed if s.name in names}
    by_dim = {s.name: s for s in parsed if s.name not in names}
    unknown = sorted(set(by_dim) - labels_or_rank)
    if unknown:
        known = ", ".join(sorted(names | labels_or_rank))
        raise UserError(f"--shapes {unknown[0]}: not an input or dynamic dim of this graph (have: {known})")
    profiles = []
    for inp in inputs:
        shape = inp["shape"]
        name = inp["name"]
        if name in by_input:
            s = by_input[name]
            if len(s.min) != len(shape):
                raise UserError(f"--shapes {name}: input has rank {len(shape)}, got rank {len(s.min)}")
            for k, d in enumerate(shape):
                if isinstance(d, int) and not (s.min[k] == s.opt[k] == s.max[k] == d):
                    raise UserError(f"--shapes {name}: dim {k} is static ({d}) in the graph")
            profiles.append(InputProfile(name, s.min, s.opt, s.max))
            continue
        if not any(isinstance(d, str) for d in shape):
            continue  # static input: TensorRT needs no profile entry
        ranges = [(d, d, d) if isinstance(d, int) else _dim_range(d, by_dim, name) for d in shape]
        profiles.append(
            InputProfile(name, tuple(r[0] for r in ranges), tuple(r[1] for r in ranges), tuple(r[2] for r in ranges))
        )
    return profiles
