"""Atomic files, RNG round trips and checkpoint folders (kdcli/run_files/checkpoint.py)."""

from __future__ import annotations

import errno
import json
import random

import numpy as np
import pytest
import torch

from kdcli.errors import RunError
from kdcli.run_files import checkpoint as ck


def _ckpt(step: int) -> ck.Checkpoint:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return ck.Checkpoint(
        position=ck.Position(step=step, epoch=1, batch_in_epoch=3, samples_seen=40),
        student=model.state_dict(),
        objective={"projections.0.weight": torch.zeros(2, 2)},
        optimizer=opt.state_dict(),
        scheduler=sched.state_dict(),
        scaler=None,
        rng=ck.capture_rng(),
    )


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "a.json"
    ck.atomic_write_json(target, {"x": 1})
    ck.atomic_write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "a.txt"
    ck.atomic_write_text(target, "old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ck.atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_rng_round_trip_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    state = ck.capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), random.gauss(0, 1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item(), random.gauss(0, 1)) == expected


def test_save_and_load_checkpoint(tmp_path):
    saved = _ckpt(5)
    folder = ck.save_checkpoint(tmp_path, saved)
    assert folder == tmp_path / "checkpoints" / "step-5"
    assert json.loads((folder / "meta.json").read_text())["step"] == 5
    loaded = ck.load_checkpoint(folder)
    assert loaded.position == saved.position
    assert torch.equal(loaded.student["weight"], saved.student["weight"])
    assert loaded.optimizer["state"][0]["step"] == saved.optimizer["state"][0]["step"]
    assert torch.equal(loaded.rng["torch"], saved.rng["torch"])


def test_latest_ignores_incomplete_and_keeps_last_two(tmp_path):
    for step in (2, 4, 6):
        ck.save_checkpoint(tmp_path, _ckpt(step), keep_last=2)
    (tmp_path / "checkpoints" / ".step-8.tmp").mkdir()  # a crash mid-write
    (tmp_path / "checkpoints" / "step-10").mkdir()  # no state.pt: not complete
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-4", "step-6"]
    assert ck.latest_checkpoint(tmp_path).name == "step-6"
    assert ck.latest_checkpoint(tmp_path / "nothing") is None


def test_resaving_a_step_replaces_it(tmp_path):
    ck.save_checkpoint(tmp_path, _ckpt(3))
    second = _ckpt(3)
    ck.save_checkpoint(tmp_path, second)
    loaded = ck.load_checkpoint(ck.latest_checkpoint(tmp_path))
    assert torch.equal(loaded.student["weight"], second.student["weight"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-3"]


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    folder = ck.save_checkpoint(tmp_path, _ckpt(1))
    payload = torch.load(folder / "state.pt", weights_only=True)
    payload["rng"]["evil"] = _Evil()
    torch.save(payload, folder / "state.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        ck.load_checkpoint(folder)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_disk_full_mid_write_keeps_the_previous_checkpoint_and_says_how_much_space(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, _ckpt(1))
    state = _ckpt(2)
    state.student["big"] = torch.zeros(512, 1024)  # 2 MiB of the state's tensors

    def no_space(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", no_space)
    with pytest.raises(RunError) as err:
        ck.save_checkpoint(tmp_path, state)
    message = str(err.value)
    assert "no space left" in message and "step-2" in message and str(tmp_path / "checkpoints") in message
    assert "needs about 2.0 MiB" in message and "free" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]  # temp folder gone
    assert isinstance(err.value, ck.DiskFullError) and err.value.needed >= 2 * 2**20


def test_disk_full_is_recognised_through_wrapping_errors():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")  # noqa: B904 (the implicit __context__ is the point)
    except RuntimeError as exc:
        wrapped = exc
    assert ck.is_no_space(wrapped)
    assert ck.is_no_space(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not ck.is_no_space(OSError(errno.EACCES, "Permission denied"))
    assert ck.nbytes({"a": torch.zeros(4, dtype=torch.float64), "b": [torch.zeros(2, dtype=torch.int8)], "c": 3}) == 34


def test_outputs_get_the_mode_an_ordinary_write_would_give(tmp_path):
    """mkstemp/mkdtemp create 0600/0700; outputs must follow the umask like any other file."""
    import os

    old = os.umask(0o022)
    try:
        target = ck.atomic_write_json(tmp_path / "summary.json", {"x": 1})
        folder = ck.save_checkpoint(tmp_path, _ckpt(1))
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o644
    assert folder.stat().st_mode & 0o777 == 0o755
