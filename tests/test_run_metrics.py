"""Reading run folders for `kdcli report` (kdcli/run_files/run_metrics.py): a run in progress is read up to
its last complete line; a garbled line, a folder without metrics.jsonl or a broken summary.json
is one problem naming the file (and line) and the fix; all problems at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdcli.errors import UsageError
from kdcli.run_files.run_metrics import read_run, read_runs

STEPS = [
    {"step": 1, "loss": 2.0, "loss/kd": 1.5, "lr": 1e-3, "samples_per_s": 10.0},
    {"step": 2, "loss": 1.5, "loss/kd": 1.0, "lr": 5e-4, "samples_per_s": 11.0},
    {"step": 2, "eval/accuracy": 0.75},
]


def write_run(folder: Path, records=STEPS, *, tail: str = "", summary: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (folder / "metrics.jsonl").write_text(text, encoding="utf-8")
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return folder


def problems(folders: list[Path]) -> str:
    with pytest.raises(UsageError) as caught:
        read_runs(folders)
    return str(caught.value)


def test_a_finished_run_is_read_whole(tmp_path: Path) -> None:
    run = read_run(write_run(tmp_path / "a", summary={"steps": 2}), "a")
    assert run.status == "finished" and run.summary == {"steps": 2} and run.notes == []
    assert run.series("loss") == [(1, 2.0), (2, 1.5)] and run.series("eval/accuracy") == [(2, 0.75)]
    assert run.keys() == ["loss", "loss/kd", "lr", "samples_per_s", "eval/accuracy"] and run.last_step == 2


def test_a_run_in_progress_is_read_up_to_its_last_complete_line(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "going", tail='{"step": 3, "loss": 1.2, "lr"')
    (run,) = read_runs([folder])
    assert run.status == "running or stopped" and run.last_step == 2 and len(run.steps) == 2
    assert any("line 4 is incomplete" in n and "read up to line 3" in n for n in run.notes), run.notes
    assert any("no summary.json" in n and "read up to step 2" in n for n in run.notes)
    # a last record whole but for its line break is a complete record
    run = read_run(write_run(tmp_path / "whole", tail='{"step": 3, "loss": 1.2}'), "whole")
    assert run.series("loss")[-1] == (3, 1.2) and not any("incomplete" in n for n in run.notes)


def test_a_run_that_logged_nothing_yet(tmp_path: Path) -> None:
    run = read_run(write_run(tmp_path / "new", records=[]), "new")
    assert run.steps == run.evals == [] and run.last_step is None and "nothing logged yet" in run.notes[0]


def test_non_finite_values_are_gaps(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "nan", records=[{"step": 1, "loss": float("nan")}, {"step": 2, "loss": 1.0}])
    assert read_run(folder, "nan").series("loss") == [(2, 1.0)]


@pytest.mark.parametrize(
    "line",
    ['{"step": 2, "loss": 1.0', "not json", "[1, 2]", '{"loss": 1.0}', '{"step": "2"}', '{"step": -1}', "\udcff"],
    ids=["cut", "text", "list", "no-step", "string-step", "negative-step", "bad-utf8"],
)
def test_a_garbled_line_is_one_problem_naming_the_line(tmp_path: Path, line: str) -> None:
    folder = tmp_path / "bad"
    write_run(folder)
    data = (folder / "metrics.jsonl").read_bytes()
    broken = line.encode("utf-8", "surrogateescape") + b"\n"
    (folder / "metrics.jsonl").write_bytes(data.replace(b"\n", b"\n" + broken, 1))
    message = problems([folder])
    assert f"{folder}/metrics.jsonl:2: not a JSON object with an integer step" in message
    assert "Fix: delete or repair the line" in message and len(message.splitlines()) == 1


def test_folder_problems_are_all_told_at_once(tmp_path: Path) -> None:
    good = write_run(tmp_path / "good")
    empty = tmp_path / "empty"
    empty.mkdir()
    parent = tmp_path / "runs"
    write_run(parent / "r1")
    write_run(parent / "r2")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    broken_summary = write_run(tmp_path / "broken-summary")
    (broken_summary / "summary.json").write_text("{")
    listed = write_run(tmp_path / "listed")
    (listed / "summary.json").write_text("[]")
    message = problems([good, empty, parent, a_file, tmp_path / "missing", broken_summary, listed, good])
    lines = message.splitlines()
    assert len(lines) == 7, message
    assert f"{empty}: no metrics.jsonl in this folder" in lines[0] and "training.output_dir" in lines[0]
    assert f"pass the run folders inside it: {parent / 'r1'} {parent / 'r2'}" in lines[1]
    assert f"{a_file}: not a folder" in lines[2] and f"{tmp_path / 'missing'}: no such folder" in lines[3]
    assert "summary.json: not JSON" in lines[4] and "summary.json: not a JSON object" in lines[5]
    assert f"{good}: the same run as {good}" in lines[6]


def test_the_metrics_file_itself_names_its_run(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "a")
    assert read_run(folder / "metrics.jsonl", "a").folder == folder


def test_a_metrics_file_that_is_no_regular_file(tmp_path: Path) -> None:
    import os

    (tmp_path / "dir" / "metrics.jsonl").mkdir(parents=True)
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "metrics.jsonl")  # never opened: reading would block
    message = problems([tmp_path / "dir", tmp_path / "fifo"])
    assert message.count("metrics.jsonl: cannot be read (it is not a regular file") == 2, message
