"""`lora-export serve` refuses bad input with one line before anything starts (no Ray is started)."""

from __future__ import annotations

import pytest
from cli_helpers import assert_one_line_error, run


def test_not_a_decoder_folder(tmp_path):
    assert_one_line_error(run("serve", tmp_path / "missing", ok=False), "not a folder")
    assert_one_line_error(run("serve", tmp_path, ok=False), "genai_config.json")


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--adapter", "x=/no/such/adapter"], "adapter 'x': .* does not exist"),
        (["--adapter", "x=/a", "--adapter", "x=/b"], "names 'x' twice"),
        (["--adapter", "=/a"], "NAME=PATH"),
        (["--port", "0"], "--port"),
    ],
)
def test_bad_options(serve_decoder, args, pattern):
    assert_one_line_error(run("serve", serve_decoder.folder, *args, ok=False), pattern)


def test_adapter_named_like_the_base_model(serve_decoder, tmp_path):
    name = serve_decoder.base_name
    result = run("serve", serve_decoder.folder, "--adapter", f"{name}={serve_decoder.adapters['ad4']}", ok=False)
    assert_one_line_error(result, "base model's name")


def test_proxy_location_is_checked_before_ray_starts(serve_decoder):
    """From the CLI, click's choice; from Python (`api.serve(..., proxy_location=...)`), the config's one line."""
    from lora_export.errors import UserError
    from lora_export.serving import ServeConfig

    assert_one_line_error(run("serve", serve_decoder.folder, "--proxy-location", "Nowhere", ok=False), "proxy-location")
    with pytest.raises(UserError, match="--proxy-location must be EveryNode or HeadOnly, got 'Nowhere'"):
        ServeConfig(str(serve_decoder.folder), proxy_location="Nowhere").check()
    ServeConfig(str(serve_decoder.folder), proxy_location="HeadOnly").check()
