"""bench/lm_distill.py --quick: the end-to-end LM distillation benchmark runs on tiny random models
(kdcli.distill.run, the engine's chunked step in parts, the plain full-logits step) and prints its tables."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rows(out: str, header: str) -> tuple[list[str], list[list[str]]]:
    """The columns and the rows of the markdown table whose header line starts with `header`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    columns = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return columns, rows


def test_lm_distill_quick() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "lm_distill.py"), "--quick"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-4000:]

    columns, rows = _rows(out, "| side |")
    assert columns == [
        "side",
        "tokens/s",
        "s/step",
        "% of FLOP limit",
        "matmul GFLOP/s",
        "peak MB",
        "step rise MB",
        "step-1 KD loss",
    ], out
    sides = {row[0]: row for row in rows}
    assert set(sides) == {"kdcli.distill.run (summary)", "engine step, chunked KD", "plain step, full logits"}, out
    for row in rows:
        assert float(row[1]) > 0 and float(row[2]) > 0, row
        assert re.fullmatch(r"\d+\.\d%", row[3]), row
        assert re.fullmatch(r"\d+/\d+", row[4]), row  # the matmul rate before / after the side's steps
        assert float(row[5]) > 0, row
    # the same first batch and the same student: the chunked and the plain KD loss agree
    chunked, plain = float(sides["engine step, chunked KD"][7]), float(sides["plain step, full logits"][7])
    assert chunked > 0 and abs(chunked - plain) <= 1e-5 * abs(plain), out

    columns, rows = _rows(out, "| part |")
    assert columns == ["part", "chunked s/step", "share", "GFLOP/step", "% of limit", "plain s/step", "share"], out
    parts = [row[0] for row in rows]
    assert parts == ["batch", "teacher forward", "student forward", "KD loss", "student backward", "optimizer"], out
    assert re.search(r"chunked / plain: \d+\.\d\dx tokens/s", out), out
    assert re.search(r"FLOPs per step: [\d.]+ G = teacher fwd 2\*N_T\*tok", out), out
