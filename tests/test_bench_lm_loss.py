"""bench/lm_loss.py --quick: the causal-LM KD loss benchmark runs end to end on tiny shapes and
kdcli's chunked loss agrees with full logits (and with Liger's fused linear JSD when installed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lm_loss_quick() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "lm_loss.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    rows = [line for line in out.splitlines() if line.startswith("| tiny | ")]
    cells = [[cell.strip() for cell in row.split("|")[2:7]] for row in rows]
    ran = {
        (impl, div, n) for impl, div, n, peak, seconds in cells if re.fullmatch(r"[\d,]+", peak) and float(seconds) >= 0
    }
    for impl, div in [("kdcli", "forward_kl"), ("plain", "forward_kl"), ("kdcli", "jsd"), ("plain", "jsd")]:
        for n in ("256", "512"):
            assert (impl, div, n) in ran, out
    assert "loss rel diff | grad rel diff" in out
    agreement = re.findall(r"\| tiny \| [\d,]+ \| (\w+) vs (\w+) \((\w+)\) \| (\S+) \| (\S+) \|", out)
    pairs = {(a, b, d) for a, b, d, *_ in agreement}
    assert {("kdcli", "plain", "forward_kl"), ("kdcli", "plain", "jsd")} <= pairs, out
    liger = "liger-kernel absent" not in out
    assert (("kdcli", "liger", "jsd") in pairs) == liger, out
    for *_, loss_rel, grad_rel in agreement:
        assert float(loss_rel) < 1e-5 and float(grad_rel) < 1e-5, out
    assert "kdcli/plain jsd at N 256" in out
