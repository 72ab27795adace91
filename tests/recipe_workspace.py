"""A check-recipe workspace shared by the CLI tests and the fuzz test: a teacher config.json,
small data files, and recipes that are valid on them (copy before changing)."""

from __future__ import annotations

import json
from pathlib import Path

from tiny import teacher_config, write_stub_weights

VALID = {
    "teacher": {"model": "./teacher"},
    "student": {"config": "./teacher", "overrides": {"num_hidden_layers": 2}, "init_from_teacher": [2, 4]},
    "data": {"train": "data/train.tsv", "eval": "data/dev.tsv", "max_length": 64},
    "training": {"num_epochs": 1, "batch_size": 8, "output_dir": "out"},
    "distillation": {
        "temperature": 8,
        "temperature_scheduler": ["cwsm", 1.0],
        "intermediate_matches": [
            {
                "layer_T": 0,
                "layer_S": 0,
                "feature": "hidden",
                "loss": "hidden_mse",
                "weight": 1,
                "proj": ["linear", 64, 64],
            },
            {"layer_T": [4, 4], "layer_S": [2, 2], "feature": "hidden", "loss": "nst", "weight": 1},
            {"layer_T": 4, "layer_S": 2, "feature": "attention", "loss": "attention_ce", "weight": 0.5},
        ],
    },
}
VALID_TRAIN = {
    "student": {"model": "./teacher"},
    "task": "token-classification",
    "data": {"train": {"path": "data/ner.jsonl"}, "text_column": "tokens", "label_column": "tags"},
    "training": {"num_steps": 10, "device": "cpu", "precision": "fp32"},
}


def make_workspace(root: Path) -> Path:
    (root / "teacher").mkdir(parents=True, exist_ok=True)
    (root / "teacher" / "config.json").write_text(json.dumps(teacher_config()))
    write_stub_weights(root / "teacher")
    (root / "data").mkdir(exist_ok=True)
    rows = "label\tsentence\n1\ta fine film\n0\ta dull one\n"
    (root / "data" / "train.tsv").write_text(rows)
    (root / "data" / "dev.tsv").write_text(rows)
    (root / "data" / "ner.jsonl").write_text(json.dumps({"tokens": ["a", "b"], "tags": [0, 1]}) + "\n")
    return root


# -- recipe mutations for rule tables: each returns a function that changes a recipe dict in place


def _parent(recipe: dict, path: tuple):
    node = recipe
    for key in path[:-1]:
        node = node[key]
    return node


def set_at(path: tuple, value):
    def mutate(recipe: dict) -> None:
        _parent(recipe, path)[path[-1]] = value

    return mutate


def delete_at(path: tuple):
    def mutate(recipe: dict) -> None:
        del _parent(recipe, path)[path[-1]]

    return mutate


def rename_at(path: tuple, new: str):
    def mutate(recipe: dict) -> None:
        node = _parent(recipe, path)
        node[new] = node.pop(path[-1])

    return mutate
