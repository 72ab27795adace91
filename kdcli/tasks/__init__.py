"""The tasks kdcli distils, and the facts about them that the recipe checker and the engine
both need. Torch-free: `check-recipe` imports this.

Each task's run-side behaviour (how rows are encoded, which Auto class loads the model, which
logits the KD loss sees, which metrics evaluation reports) lives in its own module in this
package behind one small interface; this file holds only the shared names.
"""

from __future__ import annotations

#: the values of a recipe's `task`
TASKS = ("sequence-classification", "token-classification", "causal-lm")

#: the values of a causal-lm recipe's `data.row_format`: plain text (every token a target),
#: prompt + completion columns (the completion's tokens are the targets), chat messages
#: (rendered with the tokenizer's chat template; the assistant turns are the targets)
ROW_FORMATS = ("text", "prompt-completion", "messages")

#: label id of positions no loss or metric reads (padding, special tokens, non-first sub-words)
IGNORE_INDEX = -100

#: causal-lm: target tokens per chunk of the output head + loss (KD, evaluation, the teacher
#: cache's top-k), so full-vocabulary logits never exist; `distillation.chunk_size`'s default
CHUNK_SIZE = 256

#: the module of each task (`kdcli/tasks/<module>.py`, holding `TASK`, a `tasks.base.Task`)
_MODULES = {
    "sequence-classification": "sequence_classification",
    "token-classification": "token_classification",
    "causal-lm": "causal_lm",
}


def task_for(name: str):
    """The `tasks.base.Task` of a task name (imports its module, which needs torch);
    `ValueError` for a name not in `TASKS`."""
    import importlib

    if name not in _MODULES:
        raise ValueError(f"unknown task {name!r}. Fix: use one of {', '.join(TASKS)}")
    return importlib.import_module(f"kdcli.tasks.{_MODULES[name]}").TASK
