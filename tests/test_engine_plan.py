"""Pure parts of the TensorRT path: profiles, flag selection by version, the plan manifest. No TensorRT needed."""

from __future__ import annotations

import pytest

from lora_export.artifacts.plan_manifest import PlanManifest
from lora_export.contract import precision as graph_precision
from lora_export.engines._trt import version_tuple
from lora_export.engines.flags import select_flags
from lora_export.engines.profiles import DIM_DEFAULTS, InputProfile, parse_shape_spec, resolve_profiles
from lora_export.errors import MissingDependencyError, UserError

MERGED_INPUTS = [
    {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
    {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]},
]
LORA_INPUTS = [
    {"name": "h.0.c_attn.lora_A.weight", "dtype": "float32", "shape": [64, "r_0"]},
    {"name": "h.0.c_attn.lora_B.weight", "dtype": "float32", "shape": ["r_0", 192]},
    {"name": "h.1.c_attn.lora_A.weight", "dtype": "float32", "shape": [64, "r_1"]},
]


# -- profiles ---------------------------------------------------------------------------------------------
def test_parse_shape_spec_full_shapes_and_dim_sizes():
    s = parse_shape_spec("input_ids:1x1,1x128,8x512")
    assert (s.name, s.min, s.opt, s.max) == ("input_ids", (1, 1), (1, 128), (8, 512))
    s = parse_shape_spec("r:0,8,64")
    assert (s.name, s.min, s.opt, s.max) == ("r", (0,), (8,), (64,))


@pytest.mark.parametrize(
    "bad", ["input_ids", "input_ids:1x1,1x128", "x:1,a,3", "x:1x2,1,1x2", "batch:4,2,8", "batch:-1,1,2", ":1,1,1"]
)
def test_parse_shape_spec_rejects_with_one_line(bad):
    with pytest.raises(UserError) as e:
        parse_shape_spec(bad)
    assert "\n" not in str(e.value)


def test_defaults_come_from_the_manifest_dynamic_dims():
    profiles = resolve_profiles(MERGED_INPUTS)
    b, s = DIM_DEFAULTS["batch"], DIM_DEFAULTS["sequence"]
    assert profiles == [
        InputProfile(n, (b[0], s[0]), (b[1], s[1]), (b[2], s[2])) for n in ("input_ids", "attention_mask")
    ]


def test_rank_dims_default_to_zero_through_64_and_r_sets_them_all():
    profiles = {p.name: p for p in resolve_profiles(MERGED_INPUTS + LORA_INPUTS)}
    a0 = profiles["h.0.c_attn.lora_A.weight"]
    assert (a0.min, a0.opt, a0.max) == ((64, 0), (64, 8), (64, 64))
    profiles = {p.name: p for p in resolve_profiles(MERGED_INPUTS + LORA_INPUTS, ["r:1,4,32"])}
    assert profiles["h.0.c_attn.lora_B.weight"].max == (32, 192)
    assert profiles["h.1.c_attn.lora_A.weight"].min == (64, 1)
    # a specific rank dim beats the `r` shorthand
    profiles = {p.name: p for p in resolve_profiles(LORA_INPUTS, ["r:1,4,32", "r_1:2,2,2"])}
    assert profiles["h.1.c_attn.lora_A.weight"].opt == (64, 2)
    assert profiles["h.0.c_attn.lora_A.weight"].opt == (64, 4)


def test_overrides_by_dim_and_by_input():
    profiles = {p.name: p for p in resolve_profiles(MERGED_INPUTS, ["batch:2,4,16", "attention_mask:1x1,2x64,4x64"])}
    assert profiles["input_ids"].min == (2, 1) and profiles["input_ids"].max == (16, 512)
    assert profiles["attention_mask"].opt == (2, 64)


def test_profile_errors_name_the_problem():
    with pytest.raises(UserError, match="not an input or dynamic dim"):
        resolve_profiles(MERGED_INPUTS, ["nope:1,1,1"])
    with pytest.raises(UserError, match="rank 2"):
        resolve_profiles(MERGED_INPUTS, ["input_ids:1,1,1"])
    with pytest.raises(UserError, match="static"):
        resolve_profiles(LORA_INPUTS, ["h.0.c_attn.lora_A.weight:32x0,32x8,32x64"])
    with pytest.raises(UserError, match="pass --shapes weird:MIN,OPT,MAX"):
        resolve_profiles([{"name": "x", "dtype": "float32", "shape": ["batch", "weird"]}])


def test_static_inputs_get_no_profile():
    assert resolve_profiles([{"name": "x", "dtype": "float32", "shape": [1, 3]}]) == []


# -- flags ------------------------------------------------------------------------------------------------
def test_version_tuple():
    assert version_tuple("10.8.0.43") == (10, 8, 0, 43)
    assert version_tuple("11.0.0rc1") == (11, 0, 0)
    with pytest.raises(ValueError):
        version_tuple("dev")


def test_trt10_fp16_graph_is_strongly_typed_and_fp32_is_not():
    f = select_flags((10, 8, 0), "fp16", refit=True)
    assert f.network_flags == ("STRONGLY_TYPED",) and f.strongly_typed
    assert f.builder_flags == ("REFIT",)
    f = select_flags((10, 0, 1), "fp32", refit=False)
    assert f.network_flags == () and f.builder_flags == () and not f.strongly_typed
    assert select_flags((10, 3), "bf16", refit=False).network_flags == ("STRONGLY_TYPED",)


def test_trt11_passes_no_precision_or_strongly_typed_flag():
    for precision in ("fp32", "fp16", "bf16"):
        f = select_flags((11, 0, 0), precision, refit=True)
        assert f.network_flags == () and f.strongly_typed
        assert f.builder_flags == ("REFIT",)
    removed = {"FP16", "BF16", "INT8", "STRONGLY_TYPED", "REFIT_IDENTICAL"}
    for version in ((10, 9), (11, 2, 1), (12, 0)):
        for precision in ("fp32", "fp16"):
            f = select_flags(version, precision, refit=True)
            assert not (set(f.builder_flags) & removed)
            assert "REFIT_IDENTICAL" not in f.builder_flags


def test_old_tensorrt_is_refused_with_exit_code_3():
    with pytest.raises(MissingDependencyError, match="needs TensorRT 10 or 11") as e:
        select_flags((8, 6, 1), "fp32", refit=False)
    assert e.value.exit_code == 3


def test_graph_precision():
    assert graph_precision(["int64", "float16"]) == "fp16"
    assert graph_precision(["float", "float32"]) == "fp32"
    assert graph_precision(["bfloat16"]) == "bf16"


# -- manifest ---------------------------------------------------------------------------------------------
def test_plan_manifest_round_trip(tmp_path):
    plan = tmp_path / "m.plan"
    m = PlanManifest(
        tensorrt="10.8.0.43",
        source={"path": "/x/m.onnx", "sha256": "ab" * 32, "kind": "merged", "precision": "fp16"},
        profiles=[InputProfile("input_ids", (1, 1), (1, 128), (8, 512)).to_dict()],
        flags=select_flags((10, 8), "fp16", refit=True).to_dict(),
        refittable=True,
        refittable_weights=["transformer.h.0.attn.c_attn.weight"],
        io={"inputs": [{"name": "input_ids", "dtype": "int64", "shape": [-1, -1]}], "outputs": []},
        base_graph={"path": "/x/base.onnx", "sha256": "cd" * 32},
        current_adapter={"name": "x", "source": "x/", "sha256": "", "weights": ["transformer.h.0.attn.c_attn.weight"]},
        build_seconds=12.5,
    )
    m.write(plan)
    back = PlanManifest.read(plan)
    assert back == m
    assert InputProfile.from_dict(back.profiles[0]).contains((2, 64))
    assert not InputProfile.from_dict(back.profiles[0]).contains((9, 64))
    assert back.current_weights == ["transformer.h.0.attn.c_attn.weight"]
    back.current_adapter = None
    assert back.current_weights == []


def test_plan_manifest_missing_and_future_format(tmp_path):
    with pytest.raises(UserError, match="not found"):
        PlanManifest.read(tmp_path / "none.plan")
    with pytest.raises(UserError, match="newer"):
        PlanManifest.from_dict({"tensorrt": "10", "source": {}, "format": 99})
