"""Shrink a device call's ``results.json`` before it is committed under ``bench/results/raw/``.

    python bench/serving/compact_raw.py bench/results/raw/serving-h100-sN-callM.json [...]

Drops ``exact_raw`` (both servers' per-token top-k logprobs: up to 1.5 MB a call) and keeps
its summary ``exactness`` / ``exactness_<system>``, which is all ``summarize.py`` reads, then
rewrites the file without indentation. Why: the working tree that travels to the GPU machine
is capped at 64 MiB, and the offline wheelhouse and models in ``.device/`` take 53 MB of it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def compact(path: Path) -> tuple[int, int]:
    """Rewrite ``path`` in place; return its size in bytes before and after."""
    before = path.stat().st_size
    doc = json.loads(path.read_text())
    doc.pop("exact_raw", None)
    path.write_text(json.dumps(doc, separators=(",", ":"), default=str) + "\n")
    return before, path.stat().st_size


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        b, a = compact(Path(arg))
        print(f"{arg}: {b} -> {a} bytes")
