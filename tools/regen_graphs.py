"""Regenerate the committed reference graphs in graphs/ (tiny GPT-2 sample), deterministically.

    python tools/regen_graphs.py            # rewrite graphs/
    python tools/regen_graphs.py --check    # regenerate into a temp dir, compare with graphs/, exit 1 if not equal

Everything is seeded (the sample's weights, the adapter, the export's example inputs). Graphs are compared
byte for byte; the JSON manifests beside them hold timestamps and versions, so they are not committed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lora_export.bench.reference_graphs import compare, regenerate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GRAPHS = ROOT / "graphs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare a fresh regeneration with graphs/")
    parser.add_argument("--out", type=Path, default=GRAPHS)
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            regenerate(Path(tmp))
            diff = compare(Path(tmp), args.out)
        print("identical" if not diff else f"differ: {', '.join(diff)}")
        return 1 if diff else 0
    for p in regenerate(args.out):
        print(f"wrote {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p} ({p.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
