"""The output folder's safety rules (kdcli/run_files/outdir.py): marker, lock, clearing, stale temps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdcli.errors import UsageError
from kdcli.run_files import outdir
from tiny import deny_writes, hold_output_lock


def previous_run(folder: Path) -> Path:
    """A folder as a finished kdcli run leaves it (marker, model, checkpoint)."""
    (folder / "checkpoints" / "step-2").mkdir(parents=True)
    (folder / "checkpoints" / "step-2" / "state.pt").write_bytes(b"x")
    (folder / "checkpoints" / "step-2" / "meta.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    outdir.write_marker(folder, {"recipe_sha256": "0" * 64})
    return folder


def test_overwrite_refuses_a_folder_kdcli_did_not_write_and_names_its_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("thesis.tex", "data.csv", "notes.txt", "b.txt", "c.txt"):
        (out / name).write_text("precious")
    (out / "figures").mkdir()
    with pytest.raises(UsageError, match=r"kdcli did not write it.*\b(thesis\.tex|data\.csv)\b.*Fix:") as err:
        outdir.RunFolder.open(out, resume=False, overwrite=True, protected=[])
    assert "\n" not in str(err.value) and "more" in str(err.value)  # a few names, then a count
    assert sorted(p.name for p in out.iterdir()) == ["b.txt", "c.txt", "data.csv", "figures", "notes.txt", "thesis.tex"]


def test_overwrite_clears_a_marked_folder_only_when_the_run_begins_writing(tmp_path):
    out = previous_run(tmp_path / "run")
    (out / "checkpoints" / ".step-4.abcd1234").mkdir()  # a save cut short by kill -9
    folder = outdir.RunFolder.open(out, resume=False, overwrite=True, protected=[])
    assert (out / "model.safetensors").exists()  # nothing deleted yet: models load first
    folder.begin({"recipe_sha256": "1" * 64})
    assert {p.name for p in out.iterdir()} == {outdir.LOCK_FILE, outdir.MARKER}
    assert json.loads((out / outdir.MARKER).read_text())["recipe_sha256"] == "1" * 64
    assert outdir.is_marked(out)
    folder.close()


def test_an_empty_folder_or_one_with_only_kdcli_files_counts_as_empty(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    (out / outdir.LOCK_FILE).write_text("12345\n")  # left by an earlier run that failed early
    folder = outdir.RunFolder.open(out, resume=False, overwrite=False, protected=[])
    folder.begin({})
    folder.close()
    assert outdir.is_marked(out)


def test_clearing_never_follows_a_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    out = previous_run(tmp_path / "run")
    (out / "link-to-outside").symlink_to(outside, target_is_directory=True)
    (out / "checkpoints" / "link").symlink_to(outside, target_is_directory=True)
    folder = outdir.RunFolder.open(out, resume=False, overwrite=True, protected=[])
    folder.begin({})
    folder.close()
    assert not (out / "link-to-outside").exists() and not (out / "link-to-outside").is_symlink()
    assert (outside / "keep.txt").read_text() == "keep"


def test_overwrite_through_a_symlink_to_a_folder_the_run_reads_is_refused(tmp_path):
    project = previous_run(tmp_path / "project")  # marked, so only the protection can refuse
    (project / "recipe.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(project, target_is_directory=True)
    with pytest.raises(UsageError, match=r"would delete .*recipe\.json"):
        outdir.RunFolder.open(link, resume=False, overwrite=True, protected=[project / "recipe.json"])
    # and a protected path given through a link into the folder
    alias = tmp_path / "alias.json"
    alias.symlink_to(project / "recipe.json")
    with pytest.raises(UsageError, match="would delete"):
        outdir.RunFolder.open(project, resume=False, overwrite=True, protected=[alias])
    assert (project / "recipe.json").exists() and (project / "model.safetensors").exists()


def test_a_folder_held_by_a_live_process_is_refused_naming_its_pid(tmp_path):
    out = previous_run(tmp_path / "run")
    holder = hold_output_lock(out)
    try:
        for resume, overwrite in ((False, True), (True, False)):
            with pytest.raises(UsageError, match=rf"in use by another kdcli run \(PID {holder.pid}\).*Fix:"):
                outdir.RunFolder.open(out, resume=resume, overwrite=overwrite, protected=[])
        assert (out / "model.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    folder = outdir.RunFolder.open(out, resume=True, overwrite=False, protected=[])  # released on kill
    assert folder.latest == out / "checkpoints" / "step-2"
    folder.close()


def test_a_stale_lock_file_of_a_dead_process_does_not_block(tmp_path):
    out = previous_run(tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / outdir.LOCK_FILE).write_text(f"{dead.pid}\n")
    folder = outdir.RunFolder.open(out, resume=True, overwrite=False, protected=[])
    assert (out / outdir.LOCK_FILE).read_text().strip() == str(os.getpid())
    folder.close()


def test_stale_temporary_files_are_removed_once_the_lock_is_held(tmp_path):
    out = previous_run(tmp_path / "run")
    ckpts = out / "checkpoints"
    stale = [ckpts / ".step-4.k2j_9x0a", ckpts / ".step-2.old-4242", out / ".save_pretrained.ab12cd34"]
    for path in stale:
        path.mkdir()
        (path / "state.pt").write_bytes(b"half")
    (out / ".summary.json.zz11yy22.tmp").write_text("half")
    (out / ".kdcli-probe-999").write_text("")
    kept = [ckpts / ".step-notes", out / ".my-secrets.tmp", out / ".git", ckpts / "step-2"]
    (ckpts / ".step-notes").write_text("mine")
    (out / ".my-secrets.tmp").write_text("mine")
    (out / ".git").mkdir()

    holder = hold_output_lock(out)
    try:
        with pytest.raises(UsageError, match="in use"):
            outdir.RunFolder.open(out, resume=True, overwrite=False, protected=[])
        assert all(p.exists() for p in stale)  # never while another process holds the folder
    finally:
        holder.kill()
        holder.wait()
    folder = outdir.RunFolder.open(out, resume=True, overwrite=False, protected=[], file_names=["summary.json"])
    folder.close()
    assert not any(p.exists() for p in stale) and not (out / ".summary.json.zz11yy22.tmp").exists()
    assert not (out / ".kdcli-probe-999").exists()
    assert all(p.exists() for p in kept)


def test_a_read_only_folder_or_parent_is_refused_with_one_message(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    deny_writes(monkeypatch, ro)
    try:
        with pytest.raises(UsageError, match=r"output folder .*ro is not writable.*Fix:"):
            outdir.RunFolder.open(ro, resume=False, overwrite=False, protected=[])
        with pytest.raises(UsageError, match=r"cannot create the output folder .*new.*Fix:"):
            outdir.RunFolder.open(ro / "new" / "run", resume=False, overwrite=False, protected=[])
    finally:
        monkeypatch.undo()
        os.chmod(ro, 0o755)
    assert not (ro / "new").exists()


def test_a_name_longer_than_the_file_system_allows_is_one_message(tmp_path):
    long = "x" * 300
    with pytest.raises(UsageError, match=r"'x{20,}.*' has 300 characters.*255.*Fix: .*shorter"):
        outdir.RunFolder.open(tmp_path / long / "run", resume=False, overwrite=False, protected=[])


def test_a_run_that_never_began_removes_the_folder_it_created_and_nothing_else(tmp_path):
    (tmp_path / "mine.txt").write_text("mine")
    out = tmp_path / "a" / "b"
    folder = outdir.RunFolder.open(out, resume=False, overwrite=False, protected=[])
    assert out.is_dir()
    folder.close()
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]

    kept = previous_run(tmp_path / "kept")
    folder = outdir.RunFolder.open(kept, resume=False, overwrite=True, protected=[])
    folder.close()  # failed before writing: the previous run stays
    assert (kept / "model.safetensors").exists() and outdir.is_marked(kept)


def test_resume_needs_a_checkpoint_and_contradicts_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(UsageError, match="holds no checkpoint"):
        outdir.RunFolder.open(out, resume=True, overwrite=False, protected=[])
    with pytest.raises(UsageError, match="contradict"):
        outdir.RunFolder.open(out, resume=True, overwrite=True, protected=[])
    (out / "file").write_text("")
    with pytest.raises(UsageError, match="is a file"):
        outdir.RunFolder.open(out / "file", resume=False, overwrite=False, protected=[])
