"""Depth-only vs width-only vs width+depth students of SmolLM2-135M-Instruct at about half its
non-embedding parameters: untrained, after the same short distillation, and their file sizes.

    python bench/lm_prune.py [--steps 8] [--batch 4] [--max-length 128] [--eval-rows 16] [--rows 16]

Each student is a `student.prune` recipe (recipes/lm-distill.json's teacher and GSM8K chats):
- depth:       15 of 30 blocks (block influence), full width;
- width:       30 blocks, hidden 384, 6 heads in 3 KV groups, MLP 1152;
- width+depth: 24 blocks (block influence), hidden 480, 6 heads in 3 KV groups, MLP 1152.
Untrained: the pruned model (Minitron activation importance on `--rows` training rows) scored
against the teacher on the first `--eval-rows` eval rows (per-token KL(teacher || student),
top-1 agreement, perplexity of the reference answers: `kdcli.tasks.causal_lm.evaluate_lm`).
Trained: the pruned student saved and distilled (`kdcli distill`'s engine, forward KL, T=1)
for `--steps` steps, scored the same way (the recipe with student.prune gives the same student;
saving it spares a second measurement on a busy 2-core machine). Then the trained student's files: fp32 and bf16 safetensors, GGUF f16 / q8_0 / q4_0
(`kdcli export`), and each GGUF's KL to the fp32 student it came from. Prints one JSON line
per result and a markdown table; writes runs/bench-lm-prune/results.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from kdcli import distill
from kdcli.compress.blocks import sample_batches
from kdcli.compress.export_gguf import export_gguf
from kdcli.compress.prune import prune_model
from kdcli.data import Collator, eval_batches, prepare_from_recipe
from kdcli.features import HEAD, FeatureCapture
from kdcli.models import load_model
from kdcli.models.loading import load_tokenizer
from kdcli.recipe import load_recipe
from kdcli.tasks.causal_lm import evaluate_lm

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "recipes" / "lm-distill.json"
OUT = REPO / "runs" / "bench-lm-prune"
STUDENTS = {
    "depth": {"num_hidden_layers": 15},
    "width": {"hidden_size": 384, "num_attention_heads": 6, "num_key_value_heads": 3, "intermediate_size": 1152},
    "width+depth": {
        "num_hidden_layers": 24,
        "hidden_size": 480,
        "num_attention_heads": 6,
        "num_key_value_heads": 3,
        "intermediate_size": 1152,
    },
}


def _recipe(name: str, prune: dict, args, pruned: Path | None = None) -> Path:
    """The student.prune recipe of `name`; with `pruned`, the same recipe distilling that saved
    pruned student (so the bench prunes once)."""
    base = json.loads(BASE.read_text())
    doc = {
        "task": "causal-lm",
        "teacher": base["teacher"],
        "student": {"prune": {**prune, "rows": args.rows}} if pruned is None else {"model": str(pruned)},
        "data": {
            **base["data"],
            "train": str(REPO / "recipes" / "data" / "gsm8k" / "train.jsonl"),
            "eval": str(REPO / "recipes" / "data" / "gsm8k" / "eval.jsonl"),
            "max_length": args.max_length,
            "max_eval_samples": args.eval_rows,
        },
        "training": {
            "num_steps": args.steps,
            "batch_size": args.batch,
            "learning_rate": args.lr,
            "warmup_ratio": 0.1,
            "log_every": 5,
            "device": "cpu",
            "precision": "fp32",
            "output_dir": str(OUT / name.replace("+", "-")),
        },
        "distillation": {"temperature": 1, "kd_loss_type": "forward_kl", "hard_label_weight": 0},
    }
    path = OUT / f"{name.replace('+', '-')}.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def _score(model, evals, t_feats) -> dict:
    with torch.inference_mode():
        cap = FeatureCapture(model.eval(), readout=HEAD)
        return evaluate_lm((cap.run(b), [f], b["labels"]) for f, b in zip(t_feats, evals))


def _non_embedding(model) -> int:
    c = model.config
    tied = c.tie_word_embeddings
    return sum(p.numel() for p in model.parameters()) - c.vocab_size * c.hidden_size * (1 if tied else 2)


def _files(folder: Path, student, evals, s_feats) -> dict:
    """Sizes of the student's files and each GGUF's KL to the fp32 student."""
    from transformers import AutoModelForCausalLM

    out = {"fp32_safetensors": (folder / "model.safetensors").stat().st_size}
    half = OUT / "bf16" / folder.name
    copy.deepcopy(student).to(torch.bfloat16).save_pretrained(half)  # never round the scored student
    out["bf16_safetensors"] = (half / "model.safetensors").stat().st_size
    for qtype in ("f16", "q8_0", "q4_0"):
        name = f"{folder.name}.{qtype}.gguf"
        start = time.perf_counter()
        export_gguf(folder, OUT / name, qtype, overwrite=True)
        out[f"gguf_{qtype}"] = (OUT / name).stat().st_size
        out[f"gguf_{qtype}_export_s"] = round(time.perf_counter() - start, 1)
        back = AutoModelForCausalLM.from_pretrained(OUT, gguf_file=name).eval()
        out[f"gguf_{qtype}_kl"] = _score(back, evals, s_feats)["kl"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-rows", type=int, default=16)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--only", nargs="*", default=list(STUDENTS))
    parser.add_argument("--files-only", action="store_true", help="redo the files of results.json's students")
    args = parser.parse_args()
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(_recipe("depth", STUDENTS["depth"], args), mode="distill")
    t = recipe.teachers[0]
    teacher = load_model(t.model, "causal-lm", gguf_file=t.gguf_file).model.eval()
    tokenizer = load_tokenizer(t.model, gguf_file=t.gguf_file)
    data = prepare_from_recipe(recipe, tokenizer)
    collator = Collator.for_tokenizer(tokenizer)
    evals = [collator.batch(data.eval, ix) for ix in eval_batches(len(data.eval), 8)]
    with torch.inference_mode():
        cap = FeatureCapture(teacher, readout=HEAD)
        t_feats = [cap.run(b) for b in evals]
    if args.files_only:
        _redo_files(evals)
        return
    results = [{"student": "teacher", "non_embedding": _non_embedding(teacher), **_score(teacher, evals, t_feats)}]
    print(json.dumps(results[0]), flush=True)
    for name in args.only:
        path = _recipe(name, STUDENTS[name], args)
        spec = load_recipe(path, mode="distill").student.prune
        student, plan = prune_model(teacher, spec, sample_batches(data, tokenizer, args.rows))
        row = {"student": name, "non_embedding": _non_embedding(student), "prune_s": round(plan.seconds, 1)}
        row["untrained"] = _score(student, evals, t_feats)
        print(json.dumps(row), flush=True)
        pruned = OUT / "pruned" / name.replace("+", "-")
        student.save_pretrained(pruned)
        tokenizer.save_pretrained(pruned)
        start = time.perf_counter()
        summary = distill.run(load_recipe(_recipe(name, {}, args, pruned), mode="distill"), overwrite=True, quiet=True)
        row["distill_s"] = round(time.perf_counter() - start, 1)
        folder = Path(summary["output_dir"])
        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(folder).eval()
        row["trained"] = _score(trained, evals, t_feats)
        with torch.inference_mode():
            s_feats = [FeatureCapture(trained, readout=HEAD).run(b) for b in evals]
        row["files"] = _files(folder, trained, evals, s_feats)
        print(json.dumps(row), flush=True)
        results.append(row)
        print(f"{name}: done", file=sys.stderr, flush=True)
    (OUT / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    _table(results)


def _redo_files(evals) -> None:
    """The file sizes and GGUF KLs of the students results.json lists, measured again."""
    from transformers import AutoModelForCausalLM

    doc = json.loads((OUT / "results.json").read_text())
    for row in doc["results"][1:]:
        folder = OUT / row["student"].replace("+", "-")
        trained = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.inference_mode():
            s_feats = [FeatureCapture(trained, readout=HEAD).run(b) for b in evals]
        row["files"] = _files(folder, trained, evals, s_feats)
        print(json.dumps(row), flush=True)
    (OUT / "results.json").write_text(json.dumps(doc, indent=1))
    _table(doc["results"])


def _table(results: list[dict]) -> None:
    print("| student | non-emb. params | prune s | untrained KL / top-1 / ppl | trained KL / top-1 / ppl |")
    print("|---|---|---|---|---|")
    for r in results[1:]:
        u, t = r["untrained"], r["trained"]
        print(
            f"| {r['student']} | {r['non_embedding'] / 1e6:.1f}M | {r['prune_s']} | "
            f"{u['kl']:.3f} / {u['top1_agreement']:.3f} / {u['perplexity']:.1f} | "
            f"{t['kl']:.3f} / {t['top1_agreement']:.3f} / {t['perplexity']:.1f} |"
        )
    print("\n| student | fp32 MB | bf16 MB | GGUF f16 MB (KL) | q8_0 MB (KL) | q4_0 MB (KL) |")
    print("|---|---|---|---|---|---|")
    for r in results[1:]:
        f = r["files"]
        cells = [f"{f[k] / 1e6:.1f}" for k in ("fp32_safetensors", "bf16_safetensors")]
        cells += [f"{f[f'gguf_{q}'] / 1e6:.1f} ({f[f'gguf_{q}_kl']:.2e})" for q in ("f16", "q8_0", "q4_0")]
        print(f"| {r['student']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
