"""Which SmolLM2 blocks the LM demo's student keeps: rank them, then score each choice untrained.

    python bench/lm_blocks.py [--keep 24 25 26] [--rank-rows 32] [--eval-rows 48]

Loads the demo teacher (recipes/lm-distill.json's GGUF), ranks its 30 blocks on the first
`--rank-rows` training rows with both measures of `kdcli.compress.block_ranking` (angular distance:
one contiguous run dropped; block influence: the lowest-BI blocks dropped), adds
`evenly_spaced(30, keep)`, builds each student (the teacher's config with `num_hidden_layers =
keep`, those blocks copied) and scores it untrained against the teacher on the first
`--eval-rows` eval rows: mean per-token KL(teacher || student), top-1 agreement and perplexity of
the reference answers (`kdcli.tasks.causal_lm.evaluate_lm`). Prints one JSON line per candidate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kdcli.compress.block_ranking import evenly_spaced, rank_blocks
from kdcli.data import Collator, eval_batches, prepare_from_recipe
from kdcli.features import HEAD, FeatureCapture
from kdcli.models import load_model
from kdcli.models.loading import load_tokenizer
from kdcli.models.students import build_student
from kdcli.recipe import load_recipe
from kdcli.tasks.causal_lm import evaluate_lm

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "lm-distill.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", type=int, nargs="+", default=[24, 25, 26])
    parser.add_argument("--rank-rows", type=int, default=32)
    parser.add_argument("--eval-rows", type=int, default=48)
    args = parser.parse_args()
    torch.manual_seed(0)
    recipe = load_recipe(RECIPE, mode="distill")
    t = recipe.teacher[0] if isinstance(recipe.teacher, list) else recipe.teacher
    start = time.perf_counter()
    teacher = load_model(t.model, "causal-lm", gguf_file=t.gguf_file).model.eval()
    tokenizer = load_tokenizer(t.model, gguf_file=t.gguf_file)
    print(f"teacher loaded in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    data = prepare_from_recipe(recipe, tokenizer)
    collator = Collator.for_tokenizer(tokenizer)
    rank = [collator.batch(data.train, range(i, min(i + 8, args.rank_rows))) for i in range(0, args.rank_rows, 8)]
    evals = [collator.batch(data.eval, ix) for ix in eval_batches(min(args.eval_rows, len(data.eval)), 8)]
    with torch.inference_mode():
        cap = FeatureCapture(teacher, readout=HEAD)
        t_feats = [cap.run(b) for b in evals]
        teacher_eval = evaluate_lm((f, None, b["labels"]) for f, b in zip(t_feats, evals))
    print(json.dumps({"model": "teacher", **teacher_eval}), flush=True)
    for keep in args.keep:
        candidates = {"evenly_spaced": evenly_spaced(30, keep)}
        for by in ("angular_distance", "block_influence"):
            start = time.perf_counter()
            ranking = rank_blocks(teacher, rank, keep, by=by)
            print(f"{by} keep {keep}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
            candidates[by] = ranking.kept
        for name, kept in candidates.items():
            student = build_student(
                t.model,
                {"num_hidden_layers": keep},
                "causal-lm",
                None,
                None,
                teacher,
                list(kept),
                gguf_file=t.gguf_file,
            ).eval()
            with torch.inference_mode():
                cap_s = FeatureCapture(student, readout=HEAD)
                scores = evaluate_lm((cap_s.run(b), [f], b["labels"]) for f, b in zip(t_feats, evals))
            dropped = [i for i in range(1, 31) if i not in kept]
            print(json.dumps({"keep": keep, "by": name, "dropped": dropped, **scores}), flush=True)


if __name__ == "__main__":
    main()
