"""Runners with one small interface (Polygraphy-style): a context manager with `infer(feeds) -> dict`.

Backends import their heavy dependencies lazily, so the CLI starts (and says what is missing) without them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

Feeds = dict[str, np.ndarray]


class Runner(Protocol):
    name: str

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc) -> None: ...

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]: ...
