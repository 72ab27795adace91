"""On-policy distillation (`distillation.on_policy`): per optimizer step, a seeded choice of the
rows whose completion the student samples (GKD's lambda, `student_share`) or the first teacher
writes (sequence-level KD, `teacher_share`); the rest keep the dataset's.

Generation is transformers' `generate`: batched (all of a step's rows for one model at once, on
this process), left-padded prompts, the KV cache, the model in eval mode and no gradient,
stopping at the tokenizer's end of sequence or the chat template's end of turn; a completion cut
at `max_new_tokens` has no end marker. A generated row is the prompt (`lm_rows.generation_prompt`:
everything before the last completion, no target) + the completion (every token a target), so
the shift rule, the divergence and the normalisation over the step's target tokens are the same
as for dataset rows; the batch's `generated` column (B,) keeps hard labels to dataset rows.

Seeds: the choice of rows and the sampling draw from a generator seeded by (run seed, step,
process), so a resumed run samples exactly what an uninterrupted one would, without RNG state of
its own in the checkpoint (the step is in it). Under DDP each process generates its own rows;
under FSDP2 `generate` runs inside the forward of the model's FSDP root (which gathers the embeddings,
final norm and head; each block gathers itself) and every process takes the same number of
decoding steps (`synced_gpus`), so the sharded blocks gather together.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn

from kdcli.engine.devices import autocast
from kdcli.errors import UsageError
from kdcli.recipe.on_policy_rules import NO_END_FIX, NO_GENERATION_PROMPT_FIX, PROMPTED_FORMATS
from kdcli.tasks.lm_rows import generated_row, generation_prompt

AT = "distillation.on_policy"
#: roles a row of a step can have
DATA, STUDENT, TEACHER = "data", "student", "teacher"
_PROBE = [{"role": "user", "content": "hi"}]


def stop_ids(tokenizer, row_format: str) -> list[int]:
    """The token ids that end a completion: the tokenizer's end of sequence and, for messages
    rows, the token the chat template closes an assistant turn with. `UsageError` when there is
    none, or when the template renders no generation prompt."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    if row_format == "messages":
        opened = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True)
        if opened == tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=False):
            raise UsageError(
                f"{AT}: the chat template renders no generation prompt, so a completion's turn cannot be "
                f"opened. Fix: {NO_GENERATION_PROMPT_FIX}"
            )
        turn = _PROBE + [{"role": "assistant", "content": "ok"}]
        text = tokenizer.apply_chat_template(turn, tokenize=False)
        after = text[text.rfind("ok") + 2 :]
        closing = tokenizer(after, add_special_tokens=False)["input_ids"][:1] if after else []
        if closing and closing[0] in set(tokenizer.all_special_ids):
            ids.append(int(closing[0]))
    if not ids:
        raise UsageError(f"{AT}: the tokenizer has no end-of-sequence token. Fix: {NO_END_FIX}")
    return sorted(set(ids))


def step_seed(seed: int, step: int, rank: int, salt: int = 0) -> int:
    """One 63-bit seed per (run seed, optimizer step, process, use)."""
    value = 0x9E3779B97F4A7C15
    for part in (seed, step, rank, salt):
        value = (value ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
    return value & 0x7FFFFFFFFFFFFFFF


def choose_roles(n: int, student_share: float, teacher_share: float, generator: torch.Generator) -> list[str]:
    """Each of a step's n rows: "student", "teacher" or "data". floor(share * n + u) rows each
    (u uniform: the shares hold in expectation whatever n), at random positions."""
    u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
    n_student = min(n, math.floor(student_share * n + u[0]))
    n_teacher = min(n - n_student, math.floor(teacher_share * n + u[1]))
    order = torch.randperm(n, generator=generator).tolist()
    roles = [DATA] * n
    for k, row in enumerate(order[: n_student + n_teacher]):
        roles[row] = STUDENT if k < n_student else TEACHER
    return roles


@dataclass
class Figures:
    """Generation since the last log: tokens, seconds, completions, ended ones, step seconds."""

    tokens: float = 0.0
    seconds: float = 0.0
    completions: float = 0.0
    ended: float = 0.0
    step_seconds: float = 0.0

    def add(self, other: Figures) -> None:
        for name in ("tokens", "seconds", "completions", "ended", "step_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Completions:
    """A batch of generated completions: each row's tokens (through its end marker) and whether it ended."""

    ids: list[list[int]] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)


def complete(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    config,
    stops: list[int],
    pad_id: int,
    device: torch.device,
    seed: int,
    sample: bool = True,
    root: Callable[[dict], Tensor] | None = None,
) -> Completions:
    """`model.generate` on left-padded prompts (eval mode, no gradient, the KV cache), sampled
    with `config`'s temperature / top_p / top_k from `seed` (greedy with `sample=False`). Each
    completion is cut after its first stop token; one without is cut at max_new_tokens.
    `root`: under FSDP2, calls `generate` with these arguments inside the model's FSDP root's
    forward (its hooks gather the root's parameters), every process in step (`synced_gpus`)."""
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    settings = {"temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k} if sample else {}
    generation = GenerationConfig(
        do_sample=sample,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=stops,
        pad_token_id=pad_id,
        use_cache=True,
        **settings,
    )
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            arguments = {"input_ids": ids, "attention_mask": mask, "generation_config": generation}
            out = (
                cast("Callable[..., Tensor]", model.generate)(**arguments)
                if root is None
                else root({**arguments, "synced_gpus": True})
            )
    finally:
        model.train(was_training)
    return _cut(out[:, width:].tolist(), set(stops))


def _cut(rows: list[list[int]], stops: set[int]) -> Completions:
    done = Completions()
    for row in rows:
        end = next((i for i, t in enumerate(row) if t in stops), None)
        done.ids.append(row if end is None else row[: end + 1])
        done.ended.append(end is not None)
    return done


class OnPolicy:
    """The run's on-policy generation: `rows_of_step` replaces the chosen rows' completions."""

    def __init__(self, config, tokenizer, row_format: str, max_length: int, seed: int, procs, sharded: bool):
        if row_format not in PROMPTED_FORMATS:  # check-recipe refuses it; a Recipe built in code may not be checked
            raise UsageError(
                f"{AT}: row_format {row_format!r} rows have no prompt to complete. "
                'Fix: use "row_format": "prompt-completion" or "messages", or remove on_policy'
            )
        self.config = config
        self.stops = stop_ids(tokenizer, row_format)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stops[0]
        self.pad_id = int(pad)
        self.room = max_length - config.max_new_tokens
        self.seed, self.rank, self.sharded = seed, procs.rank, sharded
        self.figures = Figures()

    @property
    def generates(self) -> bool:
        return bool(self.config.generates)

    def rows_of_step(self, run, step: int, rows: list[list[dict]]) -> list[list[dict]]:
        """A step's rows (per micro-batch; each row a dataset row's columns) with the chosen rows'
        completions generated; a generated row has `generated` True."""
        started = time.perf_counter()
        flat = [row for batch in rows for row in batch]
        # under FSDP2 every process must generate as many batches: the row counts do not depend on the rank
        rank = 0 if self.sharded else self.rank
        generator = torch.Generator().manual_seed(step_seed(self.seed, step, rank))
        roles = choose_roles(len(flat), self.config.student_share, self.config.teacher_share, generator)
        out = [dict(row, generated=False) for row in flat]
        figures = Figures()
        for role, model in ((STUDENT, run.student), (TEACHER, run.teachers[0] if run.teachers else None)):
            chosen = [i for i, r in enumerate(roles) if r == role]
            if not chosen or model is None:
                continue
            prompts = [generation_prompt(flat[i]["input_ids"], flat[i]["labels"], self.room) for i in chosen]
            salt = 1 if role == STUDENT else 2
            with autocast(run.device, run.autocast_precision):
                done = complete(
                    model,
                    prompts,
                    config=self.config,
                    stops=self.stops,
                    pad_id=self.pad_id,
                    device=run.device,
                    seed=step_seed(self.seed, step, self.rank, salt),
                    root=_sharded_root(run, role) if self.sharded else None,
                )
            for i, prompt, completion in zip(chosen, prompts, done.ids, strict=True):
                out[i] = dict(generated_row(prompt, completion), generated=True)
            figures.tokens += sum(len(c) for c in done.ids)
            figures.completions += len(done.ids)
            figures.ended += sum(done.ended)
        figures.seconds = time.perf_counter() - started
        self.figures.add(figures)
        sizes = [len(batch) for batch in rows]
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        return [out[s : s + n] for s, n in zip(starts, sizes, strict=True)]

    def read_figures(self, procs, device) -> dict[str, float]:
        """The log line's generation figures since the last log (summed over processes), then reset:
        generated tokens/s, the share of step time spent generating, mean completion length, the
        share of completions that ended (rather than being cut at max_new_tokens)."""
        f = self.figures
        sums = torch.tensor([f.tokens, f.seconds, f.completions, f.ended, f.step_seconds], dtype=torch.float64)
        if procs.distributed:
            sums = sums.to(device)
            torch.distributed.all_reduce(sums)
        tokens, seconds, completions, ended, step_seconds = sums.tolist()
        self.figures = Figures()
        per_rank = max(procs.world_size, 1)
        return {
            "generated_tokens_per_s": round(tokens / (seconds / per_rank), 1) if seconds > 0 else 0.0,
            "generation_share": round(seconds / step_seconds, 4) if step_seconds > 0 else 0.0,
            "completion_length": round(tokens / completions, 2) if completions else 0.0,
            "completions_ended": round(ended / completions, 4) if completions else 0.0,
        }


def _sharded_root(run, role: str) -> Callable[[dict], Tensor]:
    """Under FSDP2: `generate` inside the forward of the model's FSDP root (kdcli.engine.fsdp)."""
    if role == STUDENT:
        return lambda generation: run.step_module(None, [], 0.0, generation=generation)
    return lambda generation: run.captures_T[0](None, generation=generation)


def collate(collator, rows: list[dict]) -> dict[str, Tensor]:
    """A micro-batch of (possibly generated) rows: the collator's padding plus `generated` (B,)."""
    batch = collator(rows)
    batch["generated"] = torch.tensor([bool(r.get("generated", False)) for r in rows])
    return batch
