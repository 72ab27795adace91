"""The eval block's on-policy figures (`distillation.on_policy`), on the eval rows' prompts:

- `on_policy_kl`: KL(teacher || model) per token on the model's own sampled completions (the
  recipe's sampling, a fixed seed), the teachers' mean logits as in training;
- `repetition_4gram`: the share of 4-grams of the greedy completions that repeat an earlier
  4-gram of the same completion (loops: "which is 12 to 14, which is 12 to 14, ...");
- `greedy_ended`: the share of greedy completions that end (an end marker before max_new_tokens).

For the student at every evaluation, and once for the first teacher (its KL against the teachers
is not reported: it samples what it scores)."""

from __future__ import annotations

import torch
from torch import nn

from kdcli.engine.devices import autocast
from kdcli.engine.generate import complete, step_seed
from kdcli.tasks.lm_rows import generated_row, generation_prompt

#: the `salt` of the eval's sampling seed (training steps use 1 and 2)
_EVAL_SALT = 3


def repetition(completions: list[list[int]], n: int = 4) -> float:
    """The share of n-grams that repeat an earlier n-gram of the same completion (0 without n-grams)."""
    total = repeated = 0
    for ids in completions:
        seen: set[tuple[int, ...]] = set()
        for i in range(len(ids) - n + 1):
            gram = tuple(ids[i : i + n])
            repeated += gram in seen
            seen.add(gram)
            total += 1
    return repeated / total if total else 0.0


def _prompts(run) -> list[list[int]]:
    room = run.on_policy.room
    return [generation_prompt(row["input_ids"], row["labels"], room) for row in run.eval_set]


def _complete_all(model: nn.Module, run, prompts: list[list[int]], *, sample: bool):
    on_policy, size = run.on_policy, run.training.eval_batch_size
    ids, ended = [], []
    for start in range(0, len(prompts), size):
        with autocast(run.device, run.autocast_precision):
            done = complete(
                model,
                prompts[start : start + size],
                config=on_policy.config,
                stops=on_policy.stops,
                pad_id=on_policy.pad_id,
                device=run.device,
                seed=step_seed(on_policy.seed, start, 0, _EVAL_SALT),
                sample=sample,
            )
        ids += done.ids
        ended += done.ended
    return ids, ended


def _kl_on(model: nn.Module, run, prompts: list[list[int]], completions: list[list[int]]) -> float:
    from kdcli.engine.generate import collate
    from kdcli.features import FeatureCapture

    rows = [generated_row(p, c) for p, c in zip(prompts, completions, strict=True)]
    subject = FeatureCapture(model, readout=run.task.readout)
    teachers = [FeatureCapture(t, readout=run.task.readout) for t in run.teachers]
    size = run.training.eval_batch_size

    def batches():
        for start in range(0, len(rows), size):
            batch = {k: v.to(run.device) for k, v in collate(run.collator, rows[start : start + size]).items()}
            yield subject.run(batch), [t.run(batch) for t in teachers], batch["labels"]

    try:
        with torch.inference_mode(), autocast(run.device, run.autocast_precision):
            return run.task.evaluate(batches(), None)["kl"]
    finally:
        for capture in (subject, *teachers):
            capture.close()


def generation_metrics(model: nn.Module, run, *, with_kl: bool = True) -> dict[str, float]:
    """The on-policy eval figures of `model` (the student, or a teacher with `with_kl=False`)."""
    prompts = _prompts(run)
    greedy, ended = _complete_all(model, run, prompts, sample=False)
    out = {"repetition_4gram": repetition(greedy), "greedy_ended": sum(ended) / max(len(ended), 1)}
    if with_kl:
        sampled, _ = _complete_all(model, run, prompts, sample=True)
        out = {"on_policy_kl": _kl_on(model, run, prompts, sampled), **out}
    return out
