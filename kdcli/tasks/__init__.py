"""The tasks kdcli distils, and the facts about them that the recipe checker and the engine
both need. Torch-free: `check-recipe` imports this.

Each task's run-side behaviour (how rows are encoded, which Auto class loads the model, which
logits the KD loss sees, which metrics evaluation reports) lives in its own module in this
package behind one small interface; this file holds only the shared names.
"""

from __future__ import annotations

#: the values of a recipe's `task`
TASKS = ("sequence-classification", "token-classification")

#: label id of positions no loss or metric reads (padding, special tokens, non-first sub-words)
IGNORE_INDEX = -100
