"""The on-policy share λ (GKD's `student_share`) of the LM demo's on-policy arm, measured.

    python bench/lm_lambda.py 1              # λ = 1 (and any others: 0.25 0.75 ...)
    python bench/lm_lambda.py 1 --reuse      # re-measure finished runs

Each λ is recipes/lm-onpolicy.json with `distillation.on_policy.student_share` = λ (same student,
rows, steps, lr, seed), trained into runs/bench-lm-lambda/lam<λ> through kdcli's API, then
measured exactly as `make demo-lm` measures its arms (kdcli.demo.lm_bench): KL / top-1 /
perplexity on every eval row, on-policy KL, 4-gram repetition, ended share and mean length of
the greedy completions of the first 16 eval prompts (at most 96 new tokens). λ = 0 is the
demo's off-policy arm and λ = 0.5 its on-policy arm (their rows come from runs/demo-lm-summary.json).
One JSON line per λ on stdout; the table on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "runs" / "bench-lm-lambda"


def main() -> int:
    from kdcli import distill
    from kdcli.demo.lm import GEN_ROWS
    from kdcli.demo.lm_bench import completion_figures, load_bench, load_folder, score
    from kdcli.demo.lm_report import MAX_NEW_TOKENS
    from kdcli.demo.outputs import is_finished
    from kdcli.recipe import load_recipe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shares", type=float, nargs="+", help="student_share values")
    parser.add_argument("--reuse", action="store_true", help="re-measure finished runs")
    args = parser.parse_args()
    console = Console(stderr=True)
    base = load_recipe(REPO / "recipes" / "lm-onpolicy.json", mode="distill")
    done = {}
    for share in args.shares:
        on_policy = base.distillation.on_policy.model_copy(update={"student_share": share})
        recipe = base.model_copy(update={"distillation": base.distillation.model_copy(update={"on_policy": on_policy})})
        folder = OUT / f"lam{share:g}"
        started = time.perf_counter()
        if not (args.reuse and is_finished(folder)):
            distill.run(recipe, mode="distill", output_dir=folder, seed=recipe.training.seed, overwrite=True)
        done[share] = (folder, time.perf_counter() - started)
    bench = load_bench(REPO / "recipes" / "lm-distill.json", console, 0)
    for share, (folder, seconds) in done.items():
        model = load_folder(folder)
        row = {"student_share": share, "train_s": round(seconds, 1), **score(model, bench)}
        generated = completion_figures(model, bench, GEN_ROWS, MAX_NEW_TOKENS)
        generated.pop("answers")
        row.update(generated)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
