"""kdcli.recipe (check-recipe): model-aware rules (from config.json only), data columns, produced models,
unchecked rules and --strict, and the three report formats."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
from pathlib import Path

import pytest
from rich.console import Console

from kdcli.errors import RecipeError, UsageError
from kdcli.recipe import (
    CheckReport,
    DataSource,
    check_file,
    check_paths,
    count_labels,
    expand_paths,
    load_checked,
    read_header,
    render_github,
    render_text,
)
from recipe_workspace import set_at as _set
from tiny import teacher_config, write_stub_weights

STUDENT = {
    "model_type": "bert",
    "architectures": ["BertForMaskedLM"],
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 1000,
    "max_position_embeddings": 128,
}


def base_recipe() -> dict:
    return {
        "teacher": {"model": "./teacher"},
        "student": {"model": "./student"},
        "data": {"train": "data/train.tsv", "eval": "data/dev.tsv", "max_length": 64},
        "training": {"num_epochs": 1},
        "distillation": {
            "temperature": 8,
            "intermediate_matches": [
                {
                    "layer_T": 0,
                    "layer_S": 0,
                    "feature": "hidden",
                    "loss": "hidden_mse",
                    "weight": 1,
                    "proj": ["linear", 32, 64],
                },
                {"layer_T": [4, 4], "layer_S": [2, 2], "feature": "hidden", "loss": "mmd", "weight": 1},
                {"layer_T": 4, "layer_S": 2, "feature": "attention", "loss": "attention_mse_sum", "weight": 1},
            ],
        },
    }


@pytest.fixture
def ws(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for name, config in (("teacher", teacher_config()), ("student", STUDENT)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        write_stub_weights(tmp_path / name)
    (tmp_path / "data").mkdir()
    rows = "label\tsentence\n1\ta fine film\n0\ta dull \"quoted' one\n"
    (tmp_path / "data" / "train.tsv").write_text(rows)
    (tmp_path / "data" / "dev.tsv").write_text(rows)
    records = [{"tokens": ["a", "b"], "tags": ["O", "B-X"]}, {"tokens": ["c"], "tags": ["I-X"]}]
    (tmp_path / "data" / "ner.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "data" / "flat.jsonl").write_text(json.dumps({"tokens": "a b", "tags": "O"}) + "\n")
    return tmp_path


def write(folder: Path, recipe: dict, name: str = "recipe.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(recipe, indent=2))
    return path


def problems(path: Path, severity: str = "error", strict: bool = False) -> dict[str, str]:
    report, _ = check_file(path, strict=strict)
    return {p.path: p.message + " | " + p.fix for p in report.problems if p.severity == severity}


def test_base_recipe_is_clean(ws: Path) -> None:
    report, _ = check_file(write(ws, base_recipe()))
    assert report.valid and report.problems == [], report.problems


M = ("distillation", "intermediate_matches")


def _config_student(overrides: dict, init=None):
    def mutate(r: dict) -> None:
        r["student"] = {"config": "./teacher", "overrides": overrides}
        if init is not None:
            r["student"]["init_from_teacher"] = init
        r["distillation"]["intermediate_matches"] = []

    return mutate


def _teacher_config(**changes):
    def mutate(r: dict, ws: Path) -> None:
        (ws / "teacher" / "config.json").write_text(json.dumps(teacher_config(**changes)))

    return mutate


RULES = [
    (
        "teacher hidden layer out of range",
        _set(M + (0, "layer_T"), 5),
        "distillation.intermediate_matches[0].layer_T",
        "teacher has 4 layers",
    ),
    (
        "student layer in a list out of range",
        _set(M + (1, "layer_S"), [2, 3]),
        "distillation.intermediate_matches[1].layer_S[1]",
        "student has 2 layers",
    ),
    (
        "attention layer out of range",
        _set(M + (2, "layer_T"), 5),
        "distillation.intermediate_matches[2].layer_T",
        "attention layers 1..4",
    ),
    (
        "proj dim_S differs from the student",
        _set(M + (0, "proj"), ["linear", 64, 64]),
        "distillation.intermediate_matches[0].proj[1]",
        "student's hidden size is 32",
    ),
    (
        "proj dim_T differs from the teacher",
        _set(M + (0, "proj"), ["linear", 32, 768]),
        "distillation.intermediate_matches[0].proj[2]",
        "teacher's hidden size is 64",
    ),
    (
        "proj required for hidden_mse",
        _set(M + (0, "proj"), None),
        "distillation.intermediate_matches[0].proj",
        '"proj": ["linear", 32, 64]',
    ),
    (
        "proj required for fsp",
        _set(M + (1, "loss"), "fsp"),
        "distillation.intermediate_matches[1].proj",
        "needs equal hidden sizes",
    ),
    (
        "heads must agree for attention_mse",
        _set(M + (2, "loss"), "attention_mse"),
        "distillation.intermediate_matches[2].loss",
        "attention_mse_sum",
    ),
    (
        "heads must agree for attention_ce",
        _set(M + (2, "loss"), "attention_ce"),
        "distillation.intermediate_matches[2].loss",
        "attention_ce_mean",
    ),
    (
        "max_length over position embeddings",
        _set(("data", "max_length"), 512),
        "data.max_length",
        "128 position embeddings",
    ),
    (
        "missing text column",
        _set(("data", "text_column"), "sentense"),
        "data.text_column",
        'set data.text_column to "sentence"',
    ),
    (
        "missing default label column",
        _set(("data", "train"), "data/ner.jsonl"),
        "data.label_column",
        "the default label_column",
    ),
    (
        "init list length",
        _config_student({"num_hidden_layers": 2}, [1, 2, 3]),
        "student.init_from_teacher",
        "lists 3 blocks but the student has 2 layers",
    ),
    (
        "init block out of range",
        _config_student({"num_hidden_layers": 2}, [2, 9]),
        "student.init_from_teacher[1]",
        "blocks 1..4",
    ),
    (
        "init into another width",
        _config_student({"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4}, [2, 4]),
        "student.overrides.hidden_size",
        "hidden_size 64",
    ),
    (
        "override typo",
        _config_student({"num_hiden_layers": 2}),
        "student.overrides.num_hiden_layers",
        "did you mean 'num_hidden_layers'",
    ),
]


@pytest.mark.parametrize("mutate, path, words", [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_each_model_rule_names_its_exact_path(ws: Path, mutate, path: str, words: str) -> None:
    recipe = base_recipe()
    mutate(recipe)
    found = problems(write(ws, recipe))
    assert path in found, found
    assert words in found[path]


def test_mmd_and_sum_variants_accept_different_sizes(ws: Path) -> None:
    recipe = base_recipe()
    recipe["distillation"]["intermediate_matches"] = [
        {"layer_T": [2, 4], "layer_S": [1, 2], "feature": "hidden", "loss": "nst", "weight": 1},
        {"layer_T": 3, "layer_S": 1, "feature": "attention", "loss": "attention_ce_mean", "weight": 1},
    ]
    assert problems(write(ws, recipe)) == {}


def test_shared_vocabulary_when_matching(ws: Path) -> None:
    (ws / "student" / "config.json").write_text(json.dumps({**STUDENT, "vocab_size": 2000}))
    recipe = base_recipe()
    found = problems(write(ws, recipe))
    assert "student.model" in found and "1000 tokens and the student's 2000" in found["student.model"]
    recipe["distillation"]["intermediate_matches"] = []  # logits only, sequence-level: allowed
    assert "student.model" not in problems(write(ws, recipe))


def test_teacher_head_must_match_the_data_labels(ws: Path) -> None:
    (ws / "teacher" / "config.json").write_text(json.dumps(teacher_config(id2label={"0": "a", "1": "b", "2": "c"})))
    found = problems(write(ws, base_recipe()))
    assert "3 classes but data.train has 2 labels" in found["teacher.model"]


def test_headless_teacher_is_a_warning(ws: Path) -> None:
    (ws / "teacher" / "config.json").write_text(json.dumps(teacher_config(architectures=["BertModel"])))
    path = write(ws, base_recipe())
    assert "randomly initialised head" in problems(path, "warning")["teacher.model"]
    assert check_file(path)[0].valid


def test_unknown_override_far_from_any_field_is_a_warning(ws: Path) -> None:
    recipe = base_recipe()
    _config_student({"num_hidden_layers": 2, "my_custom_flag": True})(recipe)
    path = write(ws, recipe)
    assert "student.overrides.my_custom_flag" in problems(path, "warning")
    assert check_file(path)[0].valid


def test_token_classification_needs_list_columns(ws: Path) -> None:
    recipe = base_recipe()
    recipe["task"] = "token-classification"
    recipe["data"] = {"train": "data/ner.jsonl", "text_column": "tokens", "label_column": "tags"}
    recipe["teacher"] = {"model": "./student"}  # any teacher; heads are checked elsewhere
    recipe["distillation"]["intermediate_matches"] = []
    assert problems(write(ws, recipe)) == {}
    recipe["data"]["train"] = "data/flat.jsonl"
    found = problems(write(ws, recipe))
    assert "list of words" in found["data.text_column"] and "list of tags" in found["data.label_column"]


def test_unreadable_hub_config_is_a_warning_or_with_strict_an_error(ws: Path) -> None:
    recipe = base_recipe()
    recipe["teacher"] = {"model": "bert-base-uncased"}
    recipe["student"] = {"overrides": {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2}}
    recipe["distillation"]["intermediate_matches"][0]["proj"] = ["linear", 48, 768]
    path = write(ws, recipe)
    warnings = problems(path, "warning")
    assert "could not read the config of teacher and student config" in warnings["teacher.model"]
    assert "not checked: layer numbers" in warnings["teacher.model"]
    # the student's size is known from its overrides, so its side is still checked
    assert "student's hidden size is 32" in problems(path)["distillation.intermediate_matches[0].proj[1]"]
    strict = problems(path, strict=True)
    assert "could not read the config" in strict["teacher.model"]


def test_hub_dataset_columns_are_unchecked(ws: Path) -> None:
    recipe = base_recipe()
    recipe["data"]["eval"] = {"path": "glue", "config": "sst2"}
    path = write(ws, recipe)
    assert "were not checked" in problems(path, "warning")["data.eval"]
    assert "data.eval" in problems(path, strict=True)


def test_produced_teacher_is_described_by_its_producer(ws: Path) -> None:
    producer = {
        "student": {"config": "./teacher", "overrides": {"num_hidden_layers": 3}},
        "data": {"train": "data/train.tsv"},
        "training": {"output_dir": "./runs/ft"},
    }
    write(ws, producer, "a-finetune.json")
    recipe = base_recipe()
    recipe["teacher"] = {"model": "./runs/ft"}
    recipe["distillation"]["intermediate_matches"][1]["layer_T"] = [4, 4]  # the producer's student has 3 layers
    report, loaded = check_file(write(ws, recipe, "b-distill.json"))
    assert any("produced by" in n for n in report.notes)
    found = {p.path: p.message for p in report.errors}
    assert "teacher has 3 layers" in found["distillation.intermediate_matches[1].layer_T[0]"]
    assert not any(p.path == "teacher.model" for p in report.problems)  # 2 labels from its data: matches


def test_recipes_producing_each_other_do_not_loop(ws: Path) -> None:
    a = base_recipe()
    a["student"] = {"config": "./runs/b"}
    a["training"]["output_dir"] = "./runs/a"
    b = base_recipe()
    b["student"] = {"config": "./runs/a"}
    b["training"]["output_dir"] = "./runs/b"
    write(ws, a, "a.json")
    write(ws, b, "b.json")
    report = check_paths([ws / "a.json", ws / "b.json"])
    assert len(report.files) == 2  # finished; the cycle leaves the rules unchecked
    assert any("cycle" in p.message for f in report.files for p in f.problems)


def test_load_checked_raises_with_model_rules(ws: Path) -> None:
    recipe = base_recipe()
    recipe["distillation"]["intermediate_matches"][0]["layer_T"] = 9
    with pytest.raises(RecipeError) as info:
        load_checked(write(ws, recipe), mode="distill")
    assert info.value.problems[0].path == "distillation.intermediate_matches[0].layer_T"
    assert load_checked(write(ws, base_recipe()), mode="distill").kind == "distill"


def test_a_teacher_folder_without_weights_is_an_error_for_check_distill_and_plan(ws: Path) -> None:
    """A config.json alone passed check-recipe; only distill's from_pretrained refused it."""
    from kdcli.plan import plan_recipe

    (ws / "teacher" / "model.safetensors").unlink()
    found = problems(write(ws, base_recipe()))
    assert "config.json but no weights" in found["teacher.model"] and "model.safetensors" in found["teacher.model"]
    for run in (lambda p: load_checked(p, mode="distill"), plan_recipe):
        with pytest.raises(RecipeError, match="no weights"):
            run(write(ws, base_recipe()))
    (ws / "teacher" / "pytorch_model.bin").write_bytes(b"")  # a weight file: now it is read (and damaged)
    assert "no weights" not in problems(write(ws, base_recipe()))["teacher.model"]


@pytest.mark.parametrize("layers", [0, -1])
def test_a_teacher_config_with_no_blocks_is_an_error_for_check_distill_and_plan(ws: Path, layers: int) -> None:
    from kdcli.plan import plan_recipe

    (ws / "teacher" / "config.json").write_text(json.dumps(teacher_config(num_hidden_layers=layers)))
    recipe = base_recipe()
    recipe["distillation"]["intermediate_matches"] = []
    found = problems(write(ws, recipe))
    assert f"the teacher has {layers} transformer blocks" in found["teacher.model"]
    for run in (lambda p: load_checked(p, mode="distill"), plan_recipe):
        with pytest.raises(RecipeError, match="transformer blocks"):
            run(write(ws, recipe))
    recipe["student"] = {"config": "./teacher"}  # a student built from it has none either
    assert "the student has" in problems(write(ws, recipe))["student.config"]
    recipe["student"]["overrides"] = {"num_hidden_layers": 1}
    assert "student.config" not in problems(write(ws, recipe))


# --- data helpers --------------------------------------------------------------------------


def test_read_header_and_count_labels(ws: Path) -> None:
    tsv = DataSource(path=str(ws / "data" / "train.tsv"), format="tsv", delimiter="\t")
    assert read_header(tsv).columns == ["label", "sentence"]
    assert count_labels(tsv, "label") == 2
    ner = DataSource(path=str(ws / "data" / "ner.jsonl"), format="jsonl")
    assert read_header(ner).list_columns == {"tokens": True, "tags": True}
    assert count_labels(ner, "tags", token_level=True) == 3
    (ws / "data" / "arr.json").write_text(json.dumps([{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}]))
    arr = DataSource(path=str(ws / "data" / "arr.json"), format="json")
    assert read_header(arr).columns == ["text", "label"] and count_labels(arr, "label") == 2


def test_parquet_header(ws: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = ws / "data" / "t.parquet"
    pq.write_table(pa.table({"tokens": [["a", "b"]], "tags": [["O", "O"]], "id": [1]}), path)
    header = read_header(DataSource(path=str(path), format="parquet"))
    assert header.columns == ["tokens", "tags", "id"]
    assert header.list_columns == {"tokens": True, "tags": True, "id": False}


def test_expand_paths(ws: Path) -> None:
    write(ws, base_recipe(), "r1.json")
    (ws / "sub").mkdir()
    write(ws / "sub", base_recipe(), "r2.json")
    (ws / "sub" / "package.json").write_text('{"name": "not a recipe"}')
    found = expand_paths([ws])
    assert [p.name for p in found] == ["r1.json", "r2.json"]  # configs in teacher/ etc. skipped
    with pytest.raises(UsageError):
        expand_paths([ws / "missing.json"])


# --- rendering -------------------------------------------------------------------------------


def _bad_report(ws: Path) -> CheckReport:
    recipe = base_recipe()
    recipe["distillation"]["intermediate_matches"][2]["layer_T"] = 9
    recipe["teacher"]["trust_remote_code"] = True
    return check_paths([write(ws, recipe, "bad.json"), write(ws, base_recipe(), "good.json")])


def test_render_text_groups_per_file(ws: Path) -> None:
    console = Console(record=True, width=300)
    render_text(_bad_report(ws), console)
    text = console.export_text()
    assert "bad.json distill: invalid (1 error, 1 warning)" in text
    assert "distillation.intermediate_matches[2].layer_T" in text  # brackets not eaten as markup
    assert "good.json distill: ok" in text
    assert "2 files checked: 1 valid, 1 invalid (1 error, 1 warning)" in text


def test_render_github_annotations(ws: Path) -> None:
    lines = render_github(_bad_report(ws)).splitlines()
    error = next(line for line in lines if line.startswith("::error "))
    assert "file=bad.json" in error or "bad.json" in error
    assert ",line=" in error and ",col=" in error
    assert "title=kdcli check-recipe%3A distillation.intermediate_matches[2].layer_T" in error
    assert any(line.startswith("::warning ") for line in lines)
    assert lines[-1].startswith("kdcli check-recipe: 2 files")


def test_report_to_dict(ws: Path) -> None:
    doc = _bad_report(ws).to_dict()
    assert doc["valid"] is False and doc["summary"]["errors"] == 1
    bad = doc["files"][0]
    assert bad["valid"] is False and bad["kind"] == "distill"
    assert {"file", "path", "line", "col", "severity", "message", "fix"} <= set(bad["problems"][0])


def test_wrong_delimiter_gets_a_hint(ws: Path) -> None:
    recipe = base_recipe()
    recipe["data"]["eval"] = {"path": "data/dev.tsv", "format": "csv"}
    found = problems(write(ws, recipe))
    assert "looks tab-separated" in found["data.text_column"]


# --- what check-recipe reveals: nothing but the header of a real data file -------------------


def _every_format(report: CheckReport) -> str:
    """The report rendered as text, GitHub annotations and JSON, joined."""
    console = Console(record=True, width=400, file=io.StringIO())
    render_text(report, console)
    return (
        console.export_text() + "\n" + render_github(report) + "\n" + json.dumps(report.to_dict(), ensure_ascii=False)
    )


def _environ_values() -> list[str]:
    """The values of this process's environment as /proc shows them (the secrets at stake)."""
    raw = Path("/proc/self/environ").read_bytes().split(b"\0")
    return [v.decode(errors="replace") for v in raw if len(v) >= 12]


class _Hung(BaseException):
    """Raised by the alarm: a BaseException, so that no `except Exception` swallows it."""


@contextlib.contextmanager
def _no_hang(seconds: int = 10):
    """Fail instead of hanging (opening a FIFO for reading blocks until a writer comes, and
    reading /dev/zero never ends)."""

    def alarm(*_):
        raise _Hung("check-recipe blocked")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("target", ["/proc/self/environ", "link", "fifo", "/dev/zero", "/dev/null"])
def test_system_and_special_files_are_never_read_or_shown(ws: Path, target: str) -> None:
    (ws / "data" / "env.csv").symlink_to("/proc/self/environ")
    os.mkfifo(ws / "data" / "pipe.csv")
    path = {"link": "data/env.csv", "fifo": "data/pipe.csv"}.get(target, target)
    recipe = base_recipe()
    recipe["data"]["train"] = {"path": path, "format": "csv"}
    recipe["data"]["eval"] = {"path": path, "format": "jsonl"}
    with _no_hang():
        report = check_paths([write(ws, recipe)])
    shown = _every_format(report)
    assert not report.valid
    for value in _environ_values():
        assert value not in shown
    assert "its columns:" not in shown and "\\u0000" not in shown


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_model_folder_files_that_are_system_or_special_files_are_never_read(ws: Path) -> None:
    """The model side too: a config.json linked to /proc, a tokenizer file that is a FIFO or
    a link to /dev/zero, weights linked to /proc are neither opened nor shown."""
    (ws / "teacher" / "config.json").unlink()
    (ws / "teacher" / "config.json").symlink_to("/proc/self/environ")
    os.mkfifo(ws / "student" / "tokenizer.json")
    (ws / "student" / "vocab.txt").symlink_to("/dev/zero")
    (ws / "student" / "model.safetensors").unlink()
    (ws / "student" / "model.safetensors").symlink_to("/proc/self/environ")
    with _no_hang():
        report = check_paths([write(ws, base_recipe())])
    shown = _every_format(report)
    for value in _environ_values():
        assert value not in shown
    assert "system file" in problems(write(ws, base_recipe()), "warning")["teacher.model"]


def test_passwd_declared_as_csv_shows_nothing_and_warns(ws: Path) -> None:
    recipe = base_recipe()
    recipe["data"]["train"] = {"path": "/etc/passwd", "format": "csv", "delimiter": ":"}
    recipe["data"]["text_column"] = "sentense"
    del recipe["data"]["eval"]
    report = check_paths([write(ws, recipe)])
    shown = _every_format(report)
    for leaked in ('"root"', "root:x", "/bin/", "nologin", "daemon"):
        assert leaked not in shown
    assert "not listed" in problems(write(ws, recipe))["data.text_column"]
    warning = problems(write(ws, recipe), "warning")["data.train.path"]
    assert "/etc/passwd" in warning and "absolute path" in warning and "inside the repository" in warning


def test_paths_leaving_the_repository_warn_and_show_nothing(ws: Path, tmp_path_factory) -> None:
    (ws / ".git").mkdir()  # ws is the repository; the recipe sits in a sub-folder
    (ws / "recipes").mkdir()
    outside = tmp_path_factory.mktemp("outside")
    (outside / "dev.tsv").write_text("secretcolumn\tother\nx\ty\n")
    (outside / "neighbour-secret.tsv").write_text("a\tb\n")
    (ws / "data" / "link.tsv").symlink_to(outside / "dev.tsv")
    recipe = base_recipe()
    recipe["teacher"]["model"] = "../teacher"  # inside the repository: no warning
    recipe["student"]["model"] = str(ws / "student")  # absolute
    recipe["data"]["train"] = "../data/link.tsv"  # inside, but a link to a file outside
    recipe["data"]["eval"] = os.path.relpath(outside / "neighbour-secre.tsv", ws / "recipes")  # out through ..
    recipe["tokenizer"] = "../../" + outside.name + "/tok"
    path = write(ws / "recipes", recipe, "r.json")
    warnings = problems(path, "warning")
    assert "teacher.model" not in warnings
    assert "absolute path" in warnings["student.model"]
    assert "leads outside the recipe's repository" in warnings["data.train"]
    assert "leads outside the recipe's repository" in warnings["data.eval"]
    assert "leads outside" in warnings["tokenizer"] and str(ws) in warnings["tokenizer"]
    shown = _every_format(check_paths([path]))
    assert "secretcolumn" not in shown and "neighbour-secret" not in shown
    assert "not listed" in problems(path)["data.text_column"]


@pytest.mark.parametrize(
    "name, content, why",
    [
        ("ctl.csv", "sentence,la\x1b[2Jbel\n1,2\n", "non-printable"),
        ("nul.csv", "SECRET_TOKEN=abc\x00PATH=/bin\n", "non-printable"),
        ("long.csv", "x" * 101 + ",label\n", "over 100 characters"),
        ("huge.csv", "y" * 70_000, "over 64 KiB"),
        ("quote.csv", '"SECRET_TOKEN\nnext line",label\n', "over more than one line"),
        ("str.json", '"SECRET_TOKEN in a string"', "a string, not a JSON object"),
        ("list.jsonl", '["SECRET_TOKEN"]\n', "a list, not a JSON object"),
        ("keys.jsonl", '{"SECRET_TOKEN\\u0007": 1}\n', "non-printable"),
        ("bad.jsonl", '{"SECRET_TOKEN": \n', "cannot be parsed"),
    ],
)
def test_implausible_headers_are_errors_that_show_nothing(ws: Path, name: str, content: str, why: str) -> None:
    (ws / "data" / name).write_text(content)
    recipe = base_recipe()
    recipe["data"]["eval"] = f"data/{name}"
    report = check_paths([write(ws, recipe)])
    shown = _every_format(report)
    assert (
        "SECRET_TOKEN" not in shown and "la\x1b" not in shown and "xxxxxxxxxx" not in shown and "yyyyyyyy" not in shown
    )
    assert why in problems(write(ws, recipe))["data.eval"]


def test_a_wide_header_is_checked_but_not_listed(ws: Path) -> None:
    (ws / "data" / "wide.tsv").write_text(
        "\t".join(f"c{i}" for i in range(300)) + "\tsentence\n" + "\t".join("0" * 301) + "\n"
    )
    recipe = base_recipe()
    recipe["data"]["eval"] = "data/wide.tsv"
    found = problems(write(ws, recipe))
    assert "301 columns" in found["data.label_column"] and "c299" not in found["data.label_column"]
    assert "data.text_column" not in found


def test_text_output_prints_user_strings_as_data(ws: Path) -> None:
    (ws / "data" / "odd.tsv").write_text("root:x:0\t[red]col[/]\t:smile:\n1\t2\t3\n")
    recipe = base_recipe()
    recipe["data"]["eval"] = "data/odd.tsv"
    recipe["teacher"]["model"] = "./te\u001b[2Jacher[bold]"
    report = check_paths([write(ws, recipe)])
    console = Console(record=True, width=400, file=io.StringIO())
    render_text(report, console)
    text = console.export_text()
    assert '"root:x:0", "[red]col[/]", ":smile:"' in text and "❌" not in text and "😄" not in text
    assert "\x1b" not in text and "\\x1b[2Jacher[bold]" in text
    github = render_github(report)
    assert "\x1b" not in github and "\\x1b" in github


def test_renderers_encode_lone_surrogates_and_control_characters(ws: Path) -> None:
    from kdcli.errors import Problem
    from kdcli.recipe import FileReport

    odd = "bad\udcff\ud800\x07\u202e.json"
    report = CheckReport(
        [FileReport(odd, "train", [Problem(odd, "data.x", f"message {odd}", f"fix {odd}")], [f"note {odd}"])]
    )
    console = Console(record=True, width=400, file=io.StringIO())
    render_text(report, console)
    text = console.export_text()
    for out in (text, render_github(report), json.dumps(report.to_dict())):
        out.encode("utf-8")  # no lone surrogate left
        assert "\x07" not in out and "\u202e" not in out
    assert "bad\\udcff\\ud800\\x07\\u202e.json" in text


# --- weights, labels, tokenizers and csv records (real tiny models) ------------------------


@pytest.fixture
def real(ws: Path) -> Path:
    """ws plus real tiny models: ./t (hidden 64) and ./s (hidden 32), one tokenizer."""
    from tiny import make_tiny_bert

    make_tiny_bert(ws / "t", hidden=64)
    make_tiny_bert(ws / "s")
    return ws


def real_recipe(**data) -> dict:
    recipe = base_recipe()
    recipe["teacher"] = {"model": "./t"}
    recipe["student"] = {"model": "./s"}
    recipe["distillation"]["intermediate_matches"] = []
    recipe["data"].update(data)
    return recipe


def test_real_models_are_clean(real: Path) -> None:
    assert problems(write(real, real_recipe())) == {}


def test_config_json_must_describe_the_weights(real: Path) -> None:
    config = json.loads((real / "t" / "config.json").read_text())
    (real / "t" / "config.json").write_text(json.dumps({**config, "hidden_size": 32, "num_hidden_layers": 4}))
    found = problems(write(real, real_recipe()))["teacher.model"]
    assert (
        "config.json disagrees with its weights" in found
        and "num_hidden_layers is 4 but the weights hold 2 blocks" in found
    )
    assert "hidden_size is 32 but bert.embeddings.word_embeddings.weight is 64 wide" in found


def test_damaged_weights_are_an_error(real: Path) -> None:
    weights = real / "s" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    found = problems(write(real, real_recipe()))["student.model"]
    assert "the student's weights cannot be read" in found and "re-download" in found
    import os

    import torch

    class Hostile:
        def __reduce__(self):
            return (os.system, ("true",))

    weights.unlink()
    torch.save({"w": Hostile()}, real / "s" / "pytorch_model.bin")
    found = problems(write(real, real_recipe()))["student.model"]
    assert (
        "refused to unpickle pytorch_model.bin: it calls" in found
        and "system" in found
        and "convert it to model.safetensors" in found
    )


def test_labels_are_counted_over_train_and_eval(real: Path) -> None:
    """The teacher's 2-label config has no id2label (transformers 5): its head still counts 2."""
    assert "id2label" not in json.loads((real / "t" / "config.json").read_text())
    data = real / "data"
    (data / "five.tsv").write_text("label\tsentence\n" + "".join(f"{i}\tfilm {i}\n" for i in range(5)))
    found = problems(write(real, real_recipe(train="data/five.tsv", eval=None)))
    assert "the teacher's head has 2 classes but data.train has 5 labels (0, 1, 2, 3, 4)" in found["teacher.model"]
    (data / "names.tsv").write_text("label\tsentence\npos\ta\nneg\tb\n")
    found = problems(write(real, real_recipe(train="data/names.tsv")))
    assert "labels mix class ids and names" in found["data.label_column"] and "dev.tsv" in found["data.label_column"]
    (data / "floaty.tsv").write_text("label\tsentence\n1.0\ta\n0\tb\n")
    assert problems(write(real, real_recipe(train="data/floaty.tsv"))) == {}  # "1.0" is class 1
    (data / "blank.tsv").write_text("label\tsentence\n1\ta\n\tb\n")
    found = problems(write(real, real_recipe(train="data/blank.tsv")))
    assert "data.train file blank.tsv, column 'label', row 2: some rows have no label" in found["data.label_column"]


def test_tokenizers_are_compared_from_their_files(real: Path) -> None:
    from transformers import BertTokenizer

    from tiny import TINY_VOCAB, make_tiny_bert

    other = make_tiny_bert(real / "o")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).unlink()
    BertTokenizer(vocab={t: i for i, t in enumerate(TINY_VOCAB[:5] + TINY_VOCAB[5:][::-1])}).save_pretrained(other)
    recipe = real_recipe()
    recipe["student"] = {"model": "./o"}
    found = problems(write(real, recipe))["student.model"]  # no intermediate matches: still refused
    assert "the student was trained with another vocabulary than the teacher's tokenizer: id 5 is '.'" in found
    recipe["student"] = {"config": "./s", "overrides": {"vocab_size": 100}}
    found = problems(write(real, recipe))["student.config"]
    assert (
        f"the student config has 100 token embeddings but the teacher's tokenizer (tokenizer.json) produces ids up to {len(TINY_VOCAB) - 1}"
        in found
    )
    recipe["student"] = {"config": "./s", "overrides": {"vocab_size": len(TINY_VOCAB) + 40}}  # padded: fine
    recipe["distillation"]["intermediate_matches"] = [
        {"layer_T": 2, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1, "proj": ["linear", 32, 64]}
    ]
    assert problems(write(real, recipe)) == {}


def test_ambiguous_csv_records_are_findings(real: Path) -> None:
    (real / "data" / "open.csv").write_text('label,sentence\n0,ok\n1,"a fine film\n0,a dull one"\n1,fine\n')
    found = problems(write(real, real_recipe(train="data/open.csv", eval=None)))
    assert (
        "open.csv, line 3: a quote opened on line 3" in found["data.train"]
        and "/" not in found["data.train"].split(",")[0]
    )
    (real / "data" / "extra.csv").write_text("label,sentence\n0,ok\n1,a,b\n")
    found = problems(write(real, real_recipe(eval="data/extra.csv")))
    assert "extra.csv, line 3: 3 fields but the header has 2" in found["data.eval"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_folder_scan_never_opens_special_files(ws: Path) -> None:
    """A *.json among the recipes that is a FIFO or a link to /dev/zero or /proc is reported,
    never opened (opening a FIFO blocks; /dev/zero never ends) and never skipped silently."""
    write(ws, base_recipe(), "good.json")
    os.mkfifo(ws / "pipe.json")
    (ws / "zero.json").symlink_to("/dev/zero")
    (ws / "env.json").symlink_to("/proc/self/environ")
    with _no_hang():
        report = check_paths([ws])
    found = {Path(f.file).name: f for f in report.files}
    assert found["good.json"].valid
    for name in ("pipe.json", "zero.json", "env.json"):
        [problem] = found[name].problems
        assert "not read" in problem.message and (
            "system file" in problem.message or "not a regular file" in problem.message
        )


def test_label_values_of_files_outside_the_repository_are_not_shown(real: Path) -> None:
    (real / "data" / "names.tsv").write_text("label\tsentence\nsecret-name\ta\n0\tb\n")
    (real / "repo").mkdir()
    recipe = real_recipe(train="../data/names.tsv", eval=None)
    recipe["teacher"] = {"model": "../t"}
    recipe["student"] = {"model": "../s"}
    found = problems(write(real / "repo", recipe))["data.label_column"]
    assert "labels mix class ids and names: an id in data.train file names.tsv, column 'label', row 2" in found
    assert "secret-name" not in found
    found = problems(write(real, real_recipe(train="data/names.tsv", eval=None)))["data.label_column"]
    assert "'secret-name'" in found  # inside the repository: the values help


def test_attention_match_on_a_model_without_attention_capture(ws: Path) -> None:
    """From config.json alone: an attention match on a model type kdcli cannot capture attention
    scores of (kdcli.facts.architectures) is refused at the match's feature, naming the fix."""
    gpt2 = {
        "model_type": "gpt2",
        "architectures": ["GPT2ForSequenceClassification"],
        "n_layer": 2,
        "n_embd": 32,
        "n_head": 2,
        "vocab_size": 1000,
        "n_positions": 128,
        "pad_token_id": 0,
    }
    (ws / "gpt2").mkdir()
    (ws / "gpt2" / "config.json").write_text(json.dumps(gpt2))
    recipe = base_recipe()
    recipe["student"] = {"model": "./gpt2"}
    recipe["distillation"]["intermediate_matches"] = [
        {"layer_T": [4, 4], "layer_S": [2, 2], "feature": "hidden", "loss": "mmd", "weight": 1},
        {"layer_T": 4, "layer_S": 2, "feature": "attention", "loss": "attention_mse_sum", "weight": 1},
    ]
    found = problems(write(ws, recipe))
    message = found["distillation.intermediate_matches[1].feature"]
    assert 'the student is a "gpt2" model (config.json model_type)' in message
    assert "for bert, roberta" in message and '"feature": "hidden"' in message
    assert not any("intermediate_matches[0]" in path for path in found)
    recipe["distillation"]["intermediate_matches"].pop()
    assert not any(path.endswith(".feature") for path in problems(write(ws, recipe)))
