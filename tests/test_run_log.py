"""Progress lines, metrics.jsonl, metrics and the summary table (kdcli/run_files/run_log.py)."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from kdcli.run_files import run_log


def _info(step: int = 3) -> run_log.StepInfo:
    return run_log.StepInfo(
        step=step,
        total_steps=10,
        epoch=0.75,
        loss=1.5,
        terms={"kd": 1.25, "hidden_mse[2->1]": 0.25},
        lr=1e-4,
        samples_per_s=12.5,
        eta_s=65,
        weights={"kd": 1.0, "hidden_mse[2->1]": 1.0},
    )


def test_progress_mode():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert run_log.progress_mode(True, Tty()) == "off"
    assert run_log.progress_mode(False, Tty()) == "rich"
    assert run_log.progress_mode(False, io.StringIO()) == "plain"


def test_plain_progress_prints_every_term(capsys):
    progress = run_log.Progress("plain", 10)
    progress.show(_info())
    progress.message("eval accuracy 0.5")
    progress.close()
    err = capsys.readouterr().err
    assert "step 3/10" in err and "epoch 0.75" in err
    assert "kd 1.25" in err and "hidden_mse[2->1] 0.25" in err
    assert "lr 0.0001" in err and "12.5 samples/s" in err and "eta 1:05" in err
    assert "eval accuracy 0.5" in err


def test_quiet_progress_prints_nothing(capsys):
    progress = run_log.Progress("off", 10)
    progress.show(_info())
    progress.message("x")
    progress.close()
    assert capsys.readouterr() == ("", "")


def test_metrics_log_writes_lines_and_truncates_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = run_log.MetricsLog(path)
    for step in (1, 2, 3, 4):
        log.write(_info(step).record())
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert lines[0]["loss/kd"] == 1.25 and lines[0]["weight/kd"] == 1.0 and lines[0]["lr"] == 1e-4

    with open(path, "a") as f:
        f.write('{"step": 5, "lo')  # cut short by a crash
    resumed = run_log.MetricsLog(path, resume_step=2)
    resumed.write(_info(3).record())
    resumed.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]

    fresh = run_log.MetricsLog(path)  # a new run starts a new file
    fresh.close()
    assert path.read_text() == ""


def test_peak_memory_is_positive():
    assert run_log.peak_memory_mb("cpu") > 10


def test_summary_table_flattens_nested_fields():
    table = run_log.summary_table({"steps": 4, "eval": {"accuracy": 0.875}, "files": ["a", "b"]})
    console = Console(file=io.StringIO(), width=120)
    console.print(table)
    text = console.file.getvalue()
    assert "eval.accuracy" in text and "0.875" in text and "a, b" in text


def test_throughput_rate_and_eta():
    t = run_log.Throughput(step=0)
    t.add(64)
    rate, eta = t.read(step=2, total_steps=10)
    assert rate > 0 and eta >= 0


def test_rich_progress_shows_losses_and_messages_after_close(capsys):
    progress = run_log.Progress("rich", 10, description="distill")
    progress.advance(2)
    progress.show(_info())
    progress.message("checkpoint written")
    progress.close()
    progress.message("step 10 eval: accuracy 0.5")  # after the bar is gone (final evaluation)
    err = capsys.readouterr().err
    assert "checkpoint written" in err and "step 10 eval: accuracy 0.5" in err
    assert "hidden_mse[2->1] 0.25" in err and "3/10" in err


def test_eta_is_stable_when_windows_alternate_fast_and_slow(monkeypatch):
    """Length grouping makes consecutive windows alternate between short and long batches;
    the ETA comes from the whole session's rate, so it does not jump between log lines."""
    clock = {"t": 1000.0}
    monkeypatch.setattr(run_log.time, "perf_counter", lambda: clock["t"])
    t = run_log.Throughput(step=0)
    etas, rates = [], []
    for i in range(1, 21):  # 20 log windows of 5 steps: 1 s, then 19 s, then 1 s, ...
        clock["t"] += 1.0 if i % 2 else 19.0
        t.add(40)
        rate, eta = t.read(step=5 * i, total_steps=200)
        etas.append(eta)
        rates.append(rate)
    for before, after in zip(etas[2:], etas[3:]):  # from the third line on
        assert after <= before * 1.5  # the last window's rate made it jump 19x
    for before, after in zip(etas[10:], etas[11:]):
        assert after <= before * 1.1
    assert etas[-1] == pytest.approx((200 - 100) * (200 / 100), rel=1e-6)  # 2 s per step so far
    assert rates[-1] == pytest.approx(800 / 200)
    assert max(rates[2:]) / min(rates[2:]) < 2


def test_throughput_after_resume_counts_only_this_session(monkeypatch):
    clock = {"t": 50.0}
    monkeypatch.setattr(run_log.time, "perf_counter", lambda: clock["t"])
    t = run_log.Throughput(step=30)
    clock["t"] += 10
    t.add(100)
    rate, eta = t.read(step=40, total_steps=50)
    assert rate == pytest.approx(10) and eta == pytest.approx(10)


def test_metrics_log_on_resume_drops_later_evals_and_never_repeats_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = run_log.MetricsLog(path)
    for step in (1, 2, 3, 4):
        log.write(_info(step).record())
        if step % 2 == 0:
            log.write({"step": step, "eval/accuracy": 0.5})
    log.close()

    resumed = run_log.MetricsLog(path, resume_step=2)  # the checkpoint was at step 2
    resumed.write({"step": 2, "eval/accuracy": 0.5})  # the same evaluation again: not repeated
    resumed.write(_info(3).record())
    resumed.write({"step": 4, "eval/accuracy": 0.75})
    resumed.write({"step": 4, "eval/accuracy": 0.75})
    resumed.close()
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["step"], "eval/accuracy" in r) for r in records] == [
        (1, False),
        (2, False),
        (2, True),
        (3, False),
        (4, True),
    ]
