"""The LM demo's measuring bench: the teacher and the eval rows, loaded once, and what is measured
on any model against them (KL / top-1 / perplexity of the reference answers, greedy and sampled
completions of the eval prompts, parameters, files, CPU tokens/s)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from kdcli.errors import KdcliError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

#: the seed of the sampled completions the on-policy KL is measured on
SAMPLE_SEED = 1234


@dataclass
class Bench:
    """The teacher, its tokenizer, the eval batches and the teacher's features on them."""

    recipe: Any
    teacher: nn.Module
    tokenizer: Any
    batches: list[dict]
    teacher_features: list[Any]
    questions: list[str]
    #: encoded eval rows (their prompts are completed for the generation figures)
    rows: list[dict] = field(default_factory=list)
    collator: Any = None
    #: the rows the runs' own evals score (the first data.max_eval_samples), for the curves
    curve_batches: list[dict] = field(default_factory=list)
    curve_features: list[Any] = field(default_factory=list)
    #: the first training rows, for pruning the untrained student as the recipe does
    calibration: Any = None


def teacher_of(recipe):
    return recipe.teacher[0] if isinstance(recipe.teacher, list) else recipe.teacher


def load_bench(recipe_path: Path, console, questions: int) -> Bench:
    """The distillation recipe's teacher and every eval row (max_eval_samples ignored: the
    recipes cap the in-training evals only), with the teacher's features computed once."""
    import torch

    from kdcli.compress.blocks import sample_batches
    from kdcli.data import Collator, eval_batches, prepare_from_recipe
    from kdcli.features import HEAD, FeatureCapture
    from kdcli.models import load_model
    from kdcli.models.loading import load_tokenizer
    from kdcli.recipe import load_recipe

    recipe = load_recipe(recipe_path, mode="distill")
    ref = teacher_of(recipe)
    console.print(f"loading the teacher {ref.model} {ref.gguf_file or ''}")
    teacher = load_model(ref.model, "causal-lm", gguf_file=ref.gguf_file).model.eval()
    tokenizer = load_tokenizer(ref.model, gguf_file=ref.gguf_file)
    full = recipe.model_copy(update={"data": recipe.data.model_copy(update={"max_eval_samples": None})})
    data = prepare_from_recipe(full, tokenizer)
    if data.eval is None:
        raise KdcliError(f"{recipe_path}: the demo needs data.eval")
    collator = Collator.for_tokenizer(tokenizer)
    batches = [collator.batch(data.eval, ix) for ix in eval_batches(len(data.eval), recipe.training.eval_batch_size)]
    console.print(f"teacher forward on {len(data.eval)} eval rows")
    with torch.inference_mode():
        capture = FeatureCapture(teacher, readout=HEAD)
        features = [capture.run(b) for b in batches]
        bench = Bench(recipe, teacher, tokenizer, batches, features, eval_questions(recipe, questions))
        bench.rows, bench.collator = [data.eval[i] for i in range(len(data.eval))], collator
        cap = recipe.data.max_eval_samples
        if cap is not None and cap < len(data.eval):
            bench.curve_batches = [collator.batch(data.eval, ix) for ix in eval_batches(cap, cap)]
            bench.curve_features = [capture.run(b) for b in bench.curve_batches]
        else:
            bench.curve_batches, bench.curve_features = bench.batches, bench.teacher_features
    prune = getattr(recipe.student, "prune", None)
    if prune is not None:
        bench.calibration = sample_batches(data, tokenizer, prune.rows or 64)
    return bench


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

    from kdcli.features import HEAD, FeatureCapture
    from kdcli.tasks.causal_lm import evaluate_lm

    batches, teacher = (
        (bench.curve_batches, bench.curve_features) if curve_rows else (bench.batches, bench.teacher_features)
    )
    if model is None:
        return evaluate_lm((f, None, b["labels"]) for f, b in zip(teacher, batches))
    model.eval()
    capture = FeatureCapture(model, readout=HEAD)
    with torch.inference_mode():
        return evaluate_lm((capture.run(b), [f], b["labels"]) for f, b in zip(teacher, batches))


def untrained_student(bench: Bench) -> nn.Module:
    """The recipe's student before training: pruned from the teacher (student.prune) on the
    recipe's calibration rows, or built with its overrides and copied blocks."""
    import torch

    student = bench.recipe.student
    if getattr(student, "prune", None) is not None:
        from kdcli.compress.prune import prune_model

        model, _ = prune_model(bench.teacher, student.prune, bench.calibration, student.overrides)
        return model.eval()
    from kdcli.models.students import build_student

    ref = teacher_of(bench.recipe)
    config = student.config or ref.model
    gguf_file = student.gguf_file or (ref.gguf_file if student.config is None else None)
    torch.manual_seed(bench.recipe.training.seed)
    return build_student(
        config,
        student.overrides,
        "causal-lm",
        None,
        None,
        bench.teacher,
        student.init_from_teacher,
        gguf_file=gguf_file,
    ).eval()


def load_folder(folder: Path, gguf_file: str | None = None) -> nn.Module:
    """A saved output folder (or a GGUF file in it), loaded back the way a user would: plain
    transformers, in fp32 (a bf16 file is widened)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.disable_progress_bar()
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()


def load_checkpoint_weights(model: nn.Module, checkpoint: Path) -> nn.Module:
    """`model` with the student weights of a training checkpoint (checkpoints/step-N)."""
    from kdcli.run_files.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint).student
    model.load_state_dict(state, strict=False)
    return model.eval()


def completion_figures(model: nn.Module, bench: Bench, rows: int, max_new_tokens: int, *, with_kl: bool = True):
    """On the prompts of the first `rows` eval rows (one left-padded batch): the greedy
    completions' share of repeated 4-grams, share that end (an end marker before
    `max_new_tokens`), mean length and CPU tokens/s (new tokens / seconds of the batch), the
    decoded greedy answers; and (`with_kl`) the on-policy KL: KL(teacher || model) per token on
    the model's own completions sampled at temperature 1 (fixed seed)."""
    import torch

    from kdcli.engine.generate import complete, stop_ids
    from kdcli.engine.generation_eval import repetition
    from kdcli.tasks.lm_rows import generated_row, generation_prompt

    stops = stop_ids(bench.tokenizer, "messages")
    pad = bench.tokenizer.pad_token_id if bench.tokenizer.pad_token_id is not None else stops[0]
    room = bench.recipe.data.max_length - max_new_tokens
    prompts = [generation_prompt(r["input_ids"], r["labels"], room) for r in bench.rows[:rows]]
    config = SimpleNamespace(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0)
    cpu = torch.device("cpu")

    def run(sample: bool):
        return complete(
            model, prompts, config=config, stops=stops, pad_id=int(pad), device=cpu, seed=SAMPLE_SEED, sample=sample
        )

    start = time.perf_counter()
    greedy = run(False)
    seconds = time.perf_counter() - start
    new_tokens = sum(len(c) for c in greedy.ids)
    out = {
        "repetition_4gram": repetition(greedy.ids),
        "ended": sum(greedy.ended) / max(len(greedy.ended), 1),
        "mean_length": new_tokens / max(len(greedy.ids), 1),
        "tokens_per_s": new_tokens / max(seconds, 1e-9),
        "answers": [bench.tokenizer.decode(c, skip_special_tokens=True).strip() for c in greedy.ids],
    }
    if with_kl:
        sampled = run(True)
        generated = [generated_row(p, c) for p, c in zip(prompts, sampled.ids, strict=True)]
        batch = bench.collator(generated)
        out["on_policy_kl"] = _kl(model, bench.teacher, batch)
    return out


def _kl(model: nn.Module, teacher: nn.Module, batch: dict) -> float:
    import torch

    from kdcli.features import HEAD, FeatureCapture
    from kdcli.tasks.causal_lm import evaluate_lm

    with (
        torch.inference_mode(),
        FeatureCapture(teacher, readout=HEAD) as t,
        FeatureCapture(model, readout=HEAD) as s,
    ):
        return evaluate_lm([(s.run(batch), [t.run(batch)], batch["labels"])])["kl"]


def file_mb(path: Path | None) -> float | None:
    return path.stat().st_size / 2**20 if path is not None and path.is_file() else None


def parameters(model: nn.Module) -> tuple[int, int]:
    """(distinct parameters, those outside the token embeddings and the output head)."""
    unique = {id(p): (n, p) for n, p in model.named_parameters()}.values()
    total = sum(p.numel() for _, p in unique)
    embedding = sum(p.numel() for n, p in unique if "embed_tokens" in n or n.startswith("lm_head"))
    return total, total - embedding
