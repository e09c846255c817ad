"""Compact a study's per-question predictions for committing (developer tool).

    python tools/compact_predictions.py results/smollm2-study/sweeps/smollm2-study

Every ``predictions.jsonl`` or ``predictions.jsonl.gz`` under the directory becomes
``predictions.jsonl.xz`` (xz, preset 9) without three fields that nothing reads back and that
make up most of the bytes:

- ``prompt`` and ``likelihood_prompt``: the chat-template renderings of ``question`` (the same
  template for every row of a run; ``evaluate`` renders them again from the question);
- ``gold_logprob``: the probe's log-probability of the gold answer (its verdict
  ``likelihood_correct`` and ``gold_rank`` stay).

Everything ``analyze``, ``compare`` and the answer diagnostics read is kept, so they give the same
numbers on the compacted files (``tests/test_analysis.py``). About 11 MB of JSON per 10,400-row
run becomes 0.23–0.35 MB (greedy smaller than sampled). The source file is replaced only once the
compacted one is written.
"""

from __future__ import annotations

import json
import lzma
import os
import sys
from pathlib import Path

from spellxfer.core.outputs import OPENERS

DROPPED = ("prompt", "likelihood_prompt", "gold_logprob")


def compact(path: Path) -> Path:
    """Write ``predictions.jsonl.xz`` beside ``path`` without :data:`DROPPED`; remove ``path``."""
    opener = OPENERS.get(path.suffix, open)
    out = path.parent / "predictions.jsonl.xz"
    tmp = out.with_name(out.name + ".tmp")
    with opener(path, "rt", encoding="utf-8") as src, lzma.open(
        tmp, "wt", encoding="utf-8", preset=9
    ) as dst:
        for line in src:
            if line.strip():
                row = json.loads(line)
                dst.write(json.dumps({k: v for k, v in row.items() if k not in DROPPED}, ensure_ascii=False))
                dst.write("\n")
    os.replace(tmp, out)
    path.unlink()
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python tools/compact_predictions.py STUDY_DIR", file=sys.stderr)
        return 2
    root = Path(argv[0])
    files = sorted([*root.rglob("predictions.jsonl"), *root.rglob("predictions.jsonl.gz")])
    for i, f in enumerate(files, 1):
        out = compact(f)
        print(f"[{i}/{len(files)}] {out} ({out.stat().st_size / 1e6:.2f} MB)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
