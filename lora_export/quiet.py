"""Keep other libraries' progress bars, log lines and warnings off the user's terminal.

transformers draws a "Loading weights" bar for every `from_pretrained` and logs config notes; PEFT, torch,
onnxscript and ONNX Runtime warn about things our users did not ask about. `quiet_third_party()` silences
them for the duration of a command (the CLI's default; `lora-export --verbose` leaves them on). Our own
output (rich tables, step lines, `error:` lines) is not touched, and neither are warnings raised by
`lora_export` itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

# Loggers of libraries whose INFO/WARNING lines are not for our users.
_LOGGERS = ("transformers", "peft", "torch", "torch.onnx", "onnxscript", "onnx_ir", "onnxruntime", "huggingface_hub")
_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


@contextlib.contextmanager
def quiet_third_party(enabled: bool = True) -> Iterator[None]:
    """Within the block: no third-party progress bars, warnings or INFO/WARNING log lines (restored after)."""
    if not enabled:
        yield
        return
    saved_levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    env = contextlib.ExitStack()
    env.enter_context(environ(_ENV))  # read by transformers / huggingface_hub when they are first imported
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    restore_bars = _disable_loaded_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.filterwarnings("default", module=r"lora_export(\.|$)")
            yield
    finally:
        env.close()
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        with warnings.catch_warnings():  # huggingface_hub warns when its env variable overrides enable
            warnings.simplefilter("ignore")
            restore_bars()


@contextlib.contextmanager
def environ(variables: dict[str, str]) -> Iterator[None]:
    """`variables` set in os.environ within the block (child processes started in it inherit them); the
    previous values back after it."""
    previous = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _disable_loaded_bars():
    """Turn off transformers' and huggingface_hub's bars and transformers' verbosity if they are imported (the
    environment variables above cover a later import); return a function that puts back what was there, or
    the libraries' defaults for one first imported inside the block."""
    before = {name: _state(name) for name in ("transformers", "huggingface_hub")}
    for name in before:
        _set(name, bars=False, verbosity=logging.ERROR)

    def restore() -> None:
        for name, state in before.items():
            if state is not None:
                _set(name, *state)
            elif _state(name) is not None:  # imported inside the block
                _set(name, bars=True, verbosity=logging.WARNING)

    return restore


def _state(name: str) -> tuple[bool, int] | None:
    if name == "transformers" and "transformers.utils.logging" in sys.modules:
        tlog = sys.modules["transformers.utils.logging"]
        return tlog.is_progress_bar_enabled(), tlog.get_verbosity()
    if name == "huggingface_hub" and "huggingface_hub.utils" in sys.modules:
        return not sys.modules["huggingface_hub.utils"].are_progress_bars_disabled(), logging.WARNING
    return None


def _set(name: str, bars: bool, verbosity: int) -> None:
    if name == "transformers" and "transformers.utils.logging" in sys.modules:
        tlog = sys.modules["transformers.utils.logging"]
        tlog.enable_progress_bar() if bars else tlog.disable_progress_bar()
        tlog.set_verbosity(verbosity)
    elif name == "huggingface_hub" and "huggingface_hub.utils" in sys.modules:
        hub = sys.modules["huggingface_hub.utils"]
        hub.enable_progress_bars() if bars else hub.disable_progress_bars()
