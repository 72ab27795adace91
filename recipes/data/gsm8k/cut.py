"""Cut the LM demo's GSM8K sample from the project's shared copy (see README.md beside this file).

    python recipes/data/gsm8k/cut.py                       # rewrites train.jsonl and eval.jsonl here
    python recipes/data/gsm8k/cut.py --source PATH --out DIR

`random.Random(SEED).sample(range(n), TRAIN + EVAL)` picks distinct row numbers of the source
file; the first EVAL of them are the eval rows and the next TRAIN the training rows (so the two
are disjoint), each kept in the source's order. Every row becomes one chat:
`{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}`,
question and answer copied unchanged (the answer keeps GSM8K's `<<48/2=24>>` calculator
annotations and its final `#### <number>` line).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[3] / "shared" / "data" / "gsm8k" / "train.jsonl"
SEED = 20261129
TRAIN = 160
EVAL = 48


def cut(lines: list[str], *, seed: int = SEED, train: int = TRAIN, eval_rows: int = EVAL) -> dict[str, list[str]]:
    """The source's JSON lines -> {"train": [...], "eval": [...]}: chat rows as JSON lines."""
    picked = random.Random(seed).sample(range(len(lines)), train + eval_rows)
    splits = {"eval": sorted(picked[:eval_rows]), "train": sorted(picked[eval_rows:])}
    out: dict[str, list[str]] = {}
    for name, numbers in splits.items():
        rows = []
        for i in numbers:
            record = json.loads(lines[i])
            messages = [
                {"role": "user", "content": record["question"]},
                {"role": "assistant", "content": record["answer"]},
            ]
            rows.append(json.dumps({"messages": messages}, ensure_ascii=False))
        out[name] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    lines = args.source.read_text(encoding="utf-8").splitlines()
    for name, rows in cut(lines).items():
        (args.out / f"{name}.jsonl").write_text("".join(row + "\n" for row in rows), encoding="utf-8")
        print(f"{args.out / name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
