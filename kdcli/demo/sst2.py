"""The SST-2 quickstart (`make demo`): teacher fine-tune -> distil -> control -> comparison table.

    python -m kdcli.demo                     # what `make demo` runs (kdcli/demo/__main__.py)
    python -m kdcli.demo --retrain-teacher   # fine-tune the teacher again
    python -m kdcli.demo --reuse             # reuse finished students too (just re-measure)

Stages (the recipes are in `recipes/`, see docs/demo.md):

1. `recipes/sst2-teacher.json` (`kdcli train`): all-MiniLM-L6-v2 + a new 2-way head, one epoch
   on the 10,000 shipped SST-2 rows -> `runs/sst2-teacher`. Skipped when that folder already
   holds a finished model (config.json, model.safetensors and summary.json), so re-running the
   demo reuses the teacher; an interrupted teacher run is resumed from its checkpoint.
2. `recipes/sst2-distill.json` (`kdcli distill`): 3-layer student from teacher blocks 2, 4, 6
   -> `runs/sst2-distill`.
3. `recipes/sst2-control.json` (`kdcli train`): the same student without distillation ->
   `runs/sst2-control`.
   Stages 2 and 3 are the demo's own outputs: each re-run trains them again, overwriting
   their folders (`--reuse` keeps finished ones instead).
4. Each saved folder is loaded back with plain transformers and measured: dev accuracy on the
   recipe's eval file, parameters, size of model.safetensors, and CPU latency of one batch of
   32 dev sentences padded to 64 tokens (median of 10 after 3 warm-up runs). The table is
   printed and written, with the targets of issue 5, to `runs/demo-summary.json`.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rich.console import Console
from rich.table import Table

from kdcli.demo.outputs import RECIPES, RUNS, is_finished, rel, write_figures
from kdcli.errors import KdcliError
from kdcli.facts.tabular import dialect

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SUMMARY = RUNS / "demo-summary.json"
LATENCY_BATCH = 32
LATENCY_LENGTH = 64
#: Issue 5's calibration: what the reference (TextBrewer 0.2.1) reached on this budget.
REFERENCE = {"teacher": 0.842, "student": 0.841, "control": 0.813, "distill_s": 618.0}
#: The student must keep at least this fraction of its teacher's dev accuracy.
KEEP_FRACTION = 0.97


@dataclass(frozen=True)
class Stage:
    """One training run of the demo."""

    key: Literal["teacher", "student", "control"]
    title: str
    recipe: str  # file name in the recipes folder
    mode: Literal["train", "distill"]


STAGES = (
    Stage("teacher", "teacher, 6 layers", "sst2-teacher.json", "train"),
    Stage("student", "student, distilled", "sst2-distill.json", "distill"),
    Stage("control", "control, no KD", "sst2-control.json", "train"),
)


@dataclass
class StageRun:
    """How a stage's model came to be: trained now (seconds) or reused from an earlier run."""

    output_dir: Path
    reused: bool
    train_s: float | None


@dataclass
class Figures:
    """What the table shows for one model."""

    key: str
    title: str
    folder: str
    dev_accuracy: float
    dev_rows: int
    parameters: int
    file_mb: float
    latency_ms: float
    train_s: float | None
    reused: bool


# --- stages -----------------------------------------------------------------------------


def has_checkpoint(folder: Path) -> bool:
    checkpoints = folder / "checkpoints"
    return checkpoints.is_dir() and any(checkpoints.iterdir())


def run_stage(stage: Stage, recipes: Path, *, reuse: bool, console: Console) -> StageRun:
    """Train one stage through kdcli's public API, or reuse its finished output folder."""
    from kdcli import distill
    from kdcli.recipe import load_recipe

    recipe = load_recipe(recipes / stage.recipe, mode=stage.mode)
    output_dir = Path(recipe.training.output_dir)
    if reuse and is_finished(output_dir):
        console.print(f"[green]reusing[/] {rel(output_dir)} (finished earlier)")
        return StageRun(output_dir, reused=True, train_s=None)
    resume = reuse and has_checkpoint(output_dir)
    if resume:
        console.print(f"resuming the interrupted run in {rel(output_dir)}")
    start = time.perf_counter()
    distill.run(recipe, mode=stage.mode, resume=resume, overwrite=not resume)
    return StageRun(output_dir, reused=False, train_s=time.perf_counter() - start)


# --- measuring --------------------------------------------------------------------------


@dataclass(frozen=True)
class DevSet:
    texts: list[str]
    labels: list[int]


def read_dev(recipes: Path, stage: Stage) -> DevSet:
    """The eval rows of a stage's recipe (texts and integer labels)."""
    from kdcli.recipe import load_recipe

    recipe = load_recipe(recipes / stage.recipe, mode=stage.mode)
    data = recipe.data
    if data.eval is None or data.eval.format not in ("tsv", "csv"):
        raise KdcliError(f"{recipes / stage.recipe}: the demo needs a local tsv/csv eval file in data.eval")
    delimiter, quoting = dialect(data.eval.format, data.eval.delimiter)
    with open(data.eval.path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        rows = list(reader)
    if data.max_eval_samples is not None:
        rows = rows[: data.max_eval_samples]
    return DevSet([r[data.text_column] for r in rows], [int(r[data.label_column]) for r in rows])


def load_folder(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A saved output folder, loaded back the way a user would: plain transformers."""
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.disable_progress_bar()

    model = AutoModelForSequenceClassification.from_pretrained(folder)
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


def accuracy(model, tokenizer, dev: DevSet, *, max_length: int = 64, batch_size: int = 64) -> float:
    """Fraction of dev rows whose argmax logit equals the label (batches padded to longest)."""
    import torch

    correct = 0
    with torch.inference_mode():
        for start in range(0, len(dev.texts), batch_size):
            texts = dev.texts[start : start + batch_size]
            enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            predicted = model(**enc).logits.argmax(-1).tolist()
            correct += sum(p == y for p, y in zip(predicted, dev.labels[start : start + batch_size]))
    return correct / len(dev.texts)


def latency_ms(model, tokenizer, texts: Sequence[str], *, repeats: int = 10, warmup: int = 3) -> float:
    """Median CPU milliseconds of one forward on LATENCY_BATCH texts padded to LATENCY_LENGTH."""
    import torch

    batch = list(texts[:LATENCY_BATCH])
    enc = tokenizer(batch, truncation=True, max_length=LATENCY_LENGTH, padding="max_length", return_tensors="pt")
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(**enc)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def measure(stage: Stage, run: StageRun, dev: DevSet) -> Figures:
    model, tokenizer = load_folder(run.output_dir)
    return Figures(
        key=stage.key,
        title=stage.title,
        folder=rel(run.output_dir),
        dev_accuracy=accuracy(model, tokenizer, dev),
        dev_rows=len(dev.texts),
        parameters=sum(p.numel() for p in model.parameters()),
        file_mb=(run.output_dir / "model.safetensors").stat().st_size / 2**20,
        latency_ms=latency_ms(model, tokenizer, dev.texts),
        train_s=run.train_s,
        reused=run.reused,
    )


# --- the verdict and the table ----------------------------------------------------------


def targets(figures: dict[str, Figures]) -> dict[str, dict]:
    """Issue 5's three targets for the distilled student, each with its numbers and result."""
    teacher, student, control = (figures[k].dev_accuracy for k in ("teacher", "student", "control"))
    return {
        "keeps_97pct_of_teacher": {
            "student": student,
            "needed": KEEP_FRACTION * teacher,
            "met": student >= KEEP_FRACTION * teacher,
        },
        "beats_control": {"student": student, "control": control, "met": student > control},
        "reaches_reference": {
            "student": student,
            "reference": REFERENCE["student"],
            "met": student >= REFERENCE["student"],
        },
    }


def table(figures: dict[str, Figures]) -> Table:
    teacher = figures["teacher"]
    out = Table(
        title="SST-2 dev set: teacher vs distilled student vs control",
        caption=f"students: 3 layers from teacher blocks 2, 4, 6; latency: CPU forward of "
        f"{LATENCY_BATCH} sentences x {LATENCY_LENGTH} tokens, median of 10",
    )
    out.add_column("model", no_wrap=True)
    out.add_column("dev acc.", justify="right")
    out.add_column("/teacher", justify="right")
    out.add_column("params", justify="right")
    out.add_column("file MB", justify="right")
    out.add_column("ms/batch", justify="right")
    out.add_column("trained", justify="right")
    for f in figures.values():
        out.add_row(
            f.title,
            f"{100 * f.dev_accuracy:.1f}%",
            f"{100 * f.dev_accuracy / teacher.dev_accuracy:.1f}%",
            f"{f.parameters / 1e6:.1f} M",
            f"{f.file_mb:.1f}",
            f"{f.latency_ms:.0f}",
            "reused" if f.reused else f"{f.train_s:.0f} s",
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdcli.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--retrain-teacher", action="store_true", help="fine-tune the teacher even if runs/sst2-teacher is finished"
    )
    parser.add_argument("--reuse", action="store_true", help="reuse finished student and control folders too")
    parser.add_argument("--recipes", type=Path, default=RECIPES, help="folder holding the three sst2-*.json recipes")
    parser.add_argument("--summary", type=Path, default=SUMMARY, help="where to write the figures (JSON)")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    started = time.perf_counter()
    try:
        runs: dict[str, StageRun] = {}
        for number, stage in enumerate(STAGES, 1):
            console.rule(f"[bold]{number}/4 {stage.title}[/] · kdcli {stage.mode} recipes/{stage.recipe}")
            reuse = args.reuse or (stage.key == "teacher" and not args.retrain_teacher)
            runs[stage.key] = run_stage(stage, args.recipes, reuse=reuse, console=console)
        console.rule("[bold]4/4 measuring[/] · dev accuracy, size, CPU latency")
        dev = read_dev(args.recipes, STAGES[1])
        figures = {stage.key: measure(stage, runs[stage.key], dev) for stage in STAGES}
    except KdcliError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return getattr(exc, "exit_code", 1)
    verdict = targets(figures)
    wall = time.perf_counter() - started
    out = Console()
    if not out.is_terminal:  # a pipe or log file has no width: keep the table's columns whole
        out = Console(width=120)
    out.print(table(figures))
    for name, result in verdict.items():
        mark = "[green]met[/]" if result["met"] else "[bold red]missed[/]"
        numbers = ", ".join(f"{k} {100 * v:.1f}%" for k, v in result.items() if k != "met")
        out.print(f"target {name.replace('_', ' ')}: {mark} ({numbers})")
    out.print(f"demo wall time {wall:.0f} s; figures in {rel(args.summary)}")
    write_figures(
        args.summary,
        {
            "models": {k: asdict(f) for k, f in figures.items()},
            "targets": verdict,
            "reference": REFERENCE,
            "wall_s": wall,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
