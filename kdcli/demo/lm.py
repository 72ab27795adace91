"""The LM quickstart (`make demo-lm`): distil SmolLM2-135M-Instruct into a copy pruned to half its
non-embedding parameters, off-policy and on-policy, against cross-entropy controls; compare.

    python -m kdcli.demo.lm            # what `make demo-lm` runs
    python -m kdcli.demo.lm --reuse    # reuse finished runs (just re-measure)

Arms (recipes in `recipes/`, see docs/demo-lm.md), all from the same pruned student
(`student.prune`: 24 of 30 blocks, hidden 480, 6 heads / 3 KV groups, MLP 1152; measured on the
same 16 training chats, so the same initialisation), the same rows, steps and learning rate:

1. `lm-control.json` (`kdcli train`): cross-entropy on the reference answers -> `runs/lm-control`;
2. the same control with another seed -> `runs/lm-control-seed1` (the spread between seeds);
3. `lm-distill.json` (`kdcli distill`): off-policy KD, forward KL at T=1 -> `runs/lm-distill`;
4. `lm-onpolicy.json`: the same with half of each step's chats completed by the student itself
   (GKD's lambda = 0.5) -> `runs/lm-onpolicy`.
   Each re-run trains them again, overwriting their folders (`--reuse` keeps finished ones).
5. Measuring, in this process (kdcli.demo.lm_bench): the teacher's final hidden states on every
   eval row are computed once; the teacher, every arm's saved bf16 student loaded back with plain
   transformers, the on-policy student exported to GGUF q8_0 (`kdcli export`) and loaded back, and
   the untrained pruned student are scored on the same rows: KL(teacher || model), top-1
   agreement, perplexity of the reference answers; on the first eval prompts, the on-policy KL and
   the greedy completions' 4-gram repetition, share that end, mean length and CPU tokens/s (one
   batch); parameters, files; three of those answers side by side; the curves (`runs/demo-lm-curves.png`,
   the controls' KL from their checkpoints). Figures go to `runs/demo-lm-summary.json`; progress
   goes to stderr, the tables to stdout.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console

from kdcli.demo.lm_bench import (
    Bench,
    completion_figures,
    file_mb,
    load_bench,
    load_folder,
    parameters,
    score,
    untrained_student,
)
from kdcli.demo.lm_curves import control_kl_curves, plot_or_say_why, run_curves
from kdcli.demo.lm_report import MAX_NEW_TOKENS, Answers, Figures, answers_table, table, target_line, targets
from kdcli.demo.outputs import RECIPES, RUNS, is_finished, rel, write_figures
from kdcli.errors import KdcliError

SUMMARY = RUNS / "demo-lm-summary.json"
PLOT = RUNS / "demo-lm-curves.png"
GGUF = "student.q8_0.gguf"
#: the second control's seed (the first uses the recipe's training.seed)
CONTROL_SEED_2 = 1
#: eval questions answered side by side; eval prompts completed for the generation figures
QUESTIONS = 3
GEN_ROWS = 16


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
    Stage("control", "control, CE, seed 42", "lm-control.json", "train"),
    Stage("control2", f"control, CE, seed {CONTROL_SEED_2}", "lm-control.json", "train", CONTROL_SEED_2, "-seed1"),
    Stage("offpolicy", "KD, off-policy", "lm-distill.json", "distill"),
    Stage("onpolicy", "KD, on-policy λ=0.5", "lm-onpolicy.json", "distill"),
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
class Settings:
    questions: int = QUESTIONS
    gen_rows: int = GEN_ROWS
    max_new_tokens: int = MAX_NEW_TOKENS


def _figures(key: str, title: str, model, bench: Bench, settings: Settings, *, answers: Answers) -> Figures:
    """Every figure of one model; its greedy answers go into `answers`."""
    metrics = score(model, bench)
    total, non_embedding = parameters(model)
    fig = Figures(
        key=key,
        title=title,
        kl=metrics.get("kl"),
        top1_agreement=metrics.get("top1_agreement"),
        perplexity=metrics["perplexity"],
        tokens=int(metrics["tokens"]),
        parameters=total,
        non_embedding_parameters=non_embedding,
    )
    rows = max(settings.gen_rows, settings.questions)
    generated = completion_figures(model, bench, rows, settings.max_new_tokens, with_kl=key != "teacher")
    answers.by_model[key] = generated.pop("answers")[: settings.questions]
    for name, value in generated.items():
        setattr(fig, name, value)
    return fig


def measure(
    bench: Bench, runs: dict[str, StageRun], console: Console, settings: Settings
) -> tuple[dict[str, Figures], Answers]:
    """Score the teacher, each run's saved model, the on-policy student's GGUF q8_0 and the
    untrained student."""
    from kdcli.compress.export_gguf import export_gguf

    answers = Answers(settings.max_new_tokens, list(bench.questions))
    console.print("scoring the teacher")
    figures = {
        "teacher": _figures("teacher", "teacher (GGUF Q4_1 -> fp32)", bench.teacher, bench, settings, answers=answers)
    }
    for stage in STAGES:
        run = runs[stage.key]
        console.print(f"scoring {stage.title} ({rel(run.output_dir)})")
        fig = _figures(stage.key, stage.title, load_folder(run.output_dir), bench, settings, answers=answers)
        fig.file_mb = file_mb(run.output_dir / "model.safetensors")
        fig.train_s, fig.reused, fig.folder = run.train_s, run.reused, rel(run.output_dir)
        figures[stage.key] = fig
    source = runs["onpolicy"].output_dir
    console.print(f"exporting {rel(source)} to GGUF q8_0 and scoring it loaded back")
    export_gguf(source, source / GGUF, "q8_0", overwrite=True)
    gguf = _figures("gguf", "KD, on-policy, GGUF q8_0", load_folder(source, GGUF), bench, settings, answers=answers)
    gguf.gguf_mb, gguf.folder = file_mb(source / GGUF), rel(source / GGUF)
    figures["gguf"] = gguf
    console.print("scoring the untrained student")
    model = untrained_student(bench)
    figures["untrained"] = _figures("untrained", "student, untrained (pruned)", model, bench, settings, answers=answers)
    # the curves' step 0 (every run starts from this student) and teacher line, on the runs' eval rows
    answers.step0 = score(model, bench, curve_rows=True)
    answers.teacher_curve = score(None, bench, curve_rows=True)
    return figures, answers


# --- the program ------------------------------------------------------------------------


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kdcli.demo.lm", description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs (only measure)")
    parser.add_argument("--recipes", type=Path, default=RECIPES, help="folder holding the lm-*.json recipes")
    parser.add_argument("--questions", type=int, default=QUESTIONS, help="eval questions answered side by side")
    parser.add_argument("--gen-rows", type=int, default=GEN_ROWS, help="eval prompts completed (generation figures)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="tokens per greedy answer (and for tokens/s)"
    )
    parser.add_argument("--summary", type=Path, default=SUMMARY, help="where to write the figures (JSON)")
    parser.add_argument("--plot", type=Path, default=PLOT, help="where to write the eval curves (PNG)")
    return parser.parse_args(argv)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    settings = Settings(args.questions, args.gen_rows, args.max_new_tokens)
    console = Console(stderr=True)
    started, cpu0, load0 = time.perf_counter(), _cpu_s(), os.getloadavg()
    total = len(STAGES) + 1
    try:
        runs: dict[str, StageRun] = {}
        for number, stage in enumerate(STAGES, 1):
            console.rule(f"[bold]{number}/{total} {stage.title}[/] · kdcli {stage.mode} recipes/{stage.recipe}")
            runs[stage.key] = run_stage(stage, args.recipes, reuse=args.reuse, console=console)
        console.rule(f"[bold]{total}/{total} measuring[/] · KL, top-1, perplexity, generation, size, GGUF, tokens/s")
        bench = load_bench(args.recipes / "lm-distill.json", console, args.questions)
        figures, answers = measure(bench, runs, console, settings)
        curves = run_curves({k: run.output_dir / "metrics.jsonl" for k, run in runs.items()}, answers.step0)
        for key in ("control", "control2"):
            curves[key]["kl"] = control_kl_curves(runs[key].output_dir, bench, answers.step0)
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
    wall, cpu = time.perf_counter() - started, _cpu_s() - cpu0
    load = [round(x, 2) for x in (*load0, *os.getloadavg())]
    verdict = targets(figures, wall, trained=not any(run.reused for run in runs.values()))
    out = Console()
    if not out.is_terminal:  # a pipe or log file has no width: keep the table's columns whole
        out = Console(width=180)
    rows = sum(int(b["input_ids"].shape[0]) for b in bench.batches)
    out.print(table(figures, rows, min(settings.gen_rows, rows), settings.max_new_tokens))
    for name, result in verdict.items():
        out.print(target_line(name, result))
    shown = ("teacher", "control", "offpolicy", "onpolicy")
    out.print(answers_table(answers, {k: figures[k].title for k in shown}))
    drawn = f", curves in {rel(args.plot)}" if plotted else ""
    out.print(
        f"demo wall time {wall:.0f} s, CPU time {cpu:.0f} s on {os.cpu_count()} cores, load average "
        f"{load[0]} at the start, {load[3]} at the end; figures in {rel(args.summary)}{drawn}"
    )
    write_figures(
        args.summary,
        {
            "models": {k: asdict(f) for k, f in figures.items()},
            "targets": verdict,
            "answers": asdict(answers),
            "curves": curves,
            "eval_rows": rows,
            "generation_rows": min(settings.gen_rows, rows),
            "wall_s": wall,
            "cpu_s": cpu,
            "load_average_start_end": load,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
