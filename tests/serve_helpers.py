"""Helpers for the server tests: a tiny byte-level tokenizer with a chat template, and `lora-export serve`
run as a real subprocess (started, waited for, stopped with Ctrl-C, checked to leave nothing running)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _corpus() -> list[str]:
    """Seeded pseudo-words (multi-byte characters included), enough pairs for a BPE vocabulary of 1000."""
    import random

    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "an", "el", "is", "ou", "ch", "th", "sh"]
    syllables += ["ing", "ed", "er", "qu", "é", "ö", "✓", "日本", " the", " fox", "\n"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    return [" ".join(words[i : i + 20]) for i in range(0, len(words), 20)]


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (trained here, nothing downloaded) with `<|endoftext|>` = id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m lora_export serve ...` in its own session; `stop()` sends SIGINT (Ctrl-C) and checks that
    the process and every process it started (Ray's) are gone."""

    def __init__(self, args: list[str], log_dir: Path, *, startup_timeout: float | None = 240.0):
        """Started and waited for (`startup_timeout` s); with None, not waited for: call `wait_ready`."""
        self.log = log_dir / "serve.log"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lora_export", "serve", *args],
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.descendants: list = []
        if startup_timeout is not None:
            self.wait_ready(startup_timeout)

    def wait_ready(self, timeout: float) -> None:
        import psutil

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.tail()}")
            if "serving http" in self.log.read_text(errors="replace"):
                self.descendants = psutil.Process(self.proc.pid).children(recursive=True)
                return
            time.sleep(0.5)
        self.kill()
        raise TimeoutError(f"serve was not ready within {timeout:.0f}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 90.0) -> tuple[int | None, list]:
        """Ctrl-C; returns (exit code or None if it had to be killed, processes still alive afterwards)."""
        import psutil

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None, []
        code = self.proc.returncode
        deadline = time.monotonic() + 30
        alive = [p for p in self.descendants if _alive(p)]
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = [p for p in alive if _alive(p)]
        if alive:  # leave nothing behind, even when the test is about to fail
            for p in alive:
                p.kill()
        del psutil
        return code, alive

    def kill(self) -> None:
        """Last resort: the whole session (the server and the Ray processes it started)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in self.descendants:
            if _alive(p):
                p.kill()
        self.proc.wait(30)


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
