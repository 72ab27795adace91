"""Short variants of recipes/lm-distill.json: the objective and block choices of docs/demo-lm.md.

    python bench/lm_variants.py                  # every variant, one after the other
    python bench/lm_variants.py fkl-T1 rkl-T1    # some of them

Each variant is lm-distill.json with 5 steps instead of 10 (eval at the end on the recipe's
16 eval chats) and one change: the KD loss, the temperature, the hard-label weight, or the kept
blocks. The recipes are written to runs/lm-bench/variants/NAME.json and run with
`kdcli distill NAME.json --overwrite --json`; one JSON line per variant (its eval block and
training time) is printed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "runs" / "lm-bench" / "variants"
EVENLY_SPACED_DROPPED = (3, 9, 15, 21, 27)  # kdcli.compress.block_ranking.evenly_spaced(30, 25)

VARIANTS: dict[str, dict] = {
    "fkl-T1": {"distillation": {"temperature": 1, "kd_loss_type": "forward_kl", "hard_label_weight": 0}},
    "rkl-T1": {"distillation": {"temperature": 1, "kd_loss_type": "reverse_kl", "hard_label_weight": 0}},
    "fkl-T2": {"distillation": {"temperature": 2, "kd_loss_type": "forward_kl", "hard_label_weight": 0}},
    "fkl-T1-hl0.5": {"distillation": {"temperature": 1, "kd_loss_type": "forward_kl", "hard_label_weight": 0.5}},
    "jsd-T1": {"distillation": {"temperature": 1, "kd_loss_type": "jsd", "hard_label_weight": 0}},
    "even-fkl-T1": {"init_from_teacher": [i for i in range(1, 31) if i not in EVENLY_SPACED_DROPPED]},
}


def recipe(name: str) -> dict:
    base = json.loads((REPO / "recipes" / "lm-distill.json").read_text())
    for key in ("$schema", "description"):
        base.pop(key, None)
    for split in ("train", "eval"):
        base["data"][split] = str(REPO / "recipes" / base["data"][split])
    base["training"].update(num_steps=5, eval_every=5, output_dir=name)
    change = VARIANTS[name]
    if "distillation" in change:
        base["distillation"] = change["distillation"]
    if "init_from_teacher" in change:
        # a copied-block student (the demo's first edition), not the recipe's pruned one
        base["student"] = {"overrides": {"num_hidden_layers": 25}, "init_from_teacher": change["init_from_teacher"]}
    return base


def main(names: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names or list(VARIANTS):
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(recipe(name), indent=1))
        cmd = [sys.executable, "-m", "kdcli", "distill", str(path), "--overwrite", "--json"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(json.dumps({"variant": name, "error": done.stderr[-2000:]}), flush=True)
            continue
        summary = json.loads(done.stdout)
        print(json.dumps({"variant": name, **summary["eval"], "train_s": summary["train_time_s"]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
