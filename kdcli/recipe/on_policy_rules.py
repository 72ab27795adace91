"""check-recipe's rules for `distillation.on_policy` that need no model: the task, the row format,
room for the completion, options it cannot serve. What the tokenizer must have (an end marker, a
chat template that renders a generation prompt) is checked with the model rules
(`kdcli.recipe.lm_rules`) and again by the run before step 1 (`kdcli.engine.generate`)."""

from __future__ import annotations

from kdcli.recipe.messages import JsonPath, show
from kdcli.recipe.rules import Finding
from kdcli.recipe.schema import Recipe

AT: JsonPath = ("distillation", "on_policy")
#: the row formats whose rows have a prompt to complete
PROMPTED_FORMATS = ("prompt-completion", "messages")
NO_END_FIX = (
    'use a tokenizer with an eos_token (e.g. the model\'s -Instruct tokenizer) as "tokenizer", or add '
    '"eos_token" to its tokenizer_config.json'
)
NO_GENERATION_PROMPT_FIX = (
    'use a tokenizer whose chat template handles add_generation_prompt (e.g. an -Instruct model\'s) as "tokenizer", '
    'or "row_format": "prompt-completion"'
)


def on_policy_findings(raw: dict, view: Recipe, sections: frozenset[str]) -> list[Finding]:
    """The rules that need no model: a causal-lm task with prompted rows, room left in
    data.max_length for the completion, a KD term to train generated rows with."""
    distillation = raw.get("distillation")
    if not isinstance(distillation, dict) or distillation.get("on_policy") is None:
        return []
    out: list[Finding] = []
    if raw.get("task") != "causal-lm":
        out.append(
            Finding(
                AT,
                f"on_policy generates completions, which needs task causal-lm, not {show(raw.get('task', 'sequence-classification'))}",
                'remove on_policy, or distil a language model with "task": "causal-lm"',
                at_key=True,
            )
        )
        return out
    if "distillation" not in sections or view.distillation is None or view.distillation.on_policy is None:
        return out
    config, on_policy = view.distillation, view.distillation.on_policy
    if "data" in sections:
        data = view.data
        if data.row_format not in PROMPTED_FORMATS:
            out.append(
                Finding(
                    AT,
                    f"on_policy completes each row's prompt, and row_format {show(data.row_format)} rows have none",
                    'use "row_format": "prompt-completion" or "messages", or remove on_policy',
                    at_key=True,
                )
            )
        if on_policy.max_new_tokens >= data.max_length:
            out.append(
                Finding(
                    AT + ("max_new_tokens",),
                    f"max_new_tokens {on_policy.max_new_tokens} leaves no position for the prompt: a generated row "
                    f"(prompt + completion) must fit data.max_length {data.max_length}",
                    f"use max_new_tokens < {data.max_length} (e.g. {max(1, data.max_length // 2)}), or raise data.max_length",
                )
            )
    if on_policy.generates and not config.uses_teacher_logits:
        out.append(
            Finding(
                AT,
                "generated rows are trained by the KD term only (hard labels apply to dataset rows), and "
                f"kd_loss_weight is {config.kd_loss_weight:g}",
                "set distillation.kd_loss_weight > 0, or set both shares to 0",
                at_key=True,
            )
        )
    if on_policy.student_share + on_policy.teacher_share >= 1 and config.uses_hard_labels:
        out.append(
            Finding(
                ("distillation", "hard_label_weight"),
                "every row gets a generated completion (the shares sum to 1), and hard labels apply to "
                "dataset rows only: the hard-label term is always 0",
                "remove hard_label_weight, or leave a share of rows to the dataset",
                "warning",
            )
        )
    return out
