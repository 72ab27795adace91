"""bench/lm_onpolicy.py --quick: the on-policy step split at lambda 0, 0.5, 1 and kdcli's generation
against a bare `generate` run on tiny random models and print their tables."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table(out: str, header: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_lm_onpolicy_quick() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "lm_onpolicy.py"), "--quick", "--repeat", "1", "--steps", "1"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-4000:]
    split = _table(out, "| lambda |")
    assert [row[0] for row in split] == ["0", "0.5", "1"], out
    for row in split:
        assert all(float(x) >= 0 for x in row[1:6]) and float(row[1]) > 0, row
    generation = [float(row[2]) for row in split]
    assert generation[0] < generation[2], out  # lambda 0 generates nothing
    sides = _table(out, "| side |")
    assert [row[0] for row in sides] == ["bare model.generate", "kdcli OnPolicy.rows_of_step"], out
    assert sides[0][1] == sides[1][1], out  # the same seed: the same completions, token for token
    assert re.search(r"ratio kdcli / bare: \d+\.\d+x", out), out
