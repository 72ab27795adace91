"""Cold-start time of `kdcli check-recipe`, the pre-commit / CI lint path (target: < 0.5 s).

Each run is a fresh `python -m kdcli ...` process, as a pre-commit hook starts it, timed from
spawn to exit (median and spread of --runs runs, after one warm-up run that fills the bytecode
cache). For reference the same is timed for a bare interpreter and for `kdcli --help`. Then one
`python -X importtime` run lists the slowest imports of the check-recipe path and confirms that
torch, transformers and datasets are not among them.

    .venv/bin/python bench/check_recipe.py [--runs 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "datasets")


def timed(args: list[str], runs: int) -> list[float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(args, cwd=REPO, env=env, capture_output=True)  # warm-up: bytecode cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode not in (0, 1):
            raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return times


def import_profile(args: list[str], top: int) -> tuple[list[tuple[int, str]], list[str]]:
    """(cumulative microseconds, module) of the slowest top-level imports, and heavy modules seen."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    rows, seen = [], []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:") :].split("|"))
        if not cumulative.isdigit():
            continue
        module = name.strip()
        if module.split(".")[0] in HEAVY:
            seen.append(module)
        if not name.startswith(" "):  # a top-level import (no indentation)
            rows.append((int(cumulative), module))
    return sorted(rows, reverse=True)[:top], seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    py = [sys.executable]
    cases = [
        ("python -c pass (interpreter start)", py + ["-c", "pass"]),
        ("kdcli --help", py + ["-m", "kdcli", "--help"]),
        ("check-recipe recipes/sst2-distill.json", py + ["-m", "kdcli", "check-recipe", "recipes/sst2-distill.json"]),
        ("check-recipe recipes/ (all 8 recipes)", py + ["-m", "kdcli", "check-recipe", "recipes"]),
    ]
    print(
        f"# check-recipe cold start: {args.runs} runs each, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"{'command':45s} {'median s':>9s} {'min s':>7s} {'max s':>7s}")
    for label, command in cases:
        times = timed(command, args.runs)
        print(f"{label:45s} {statistics.median(times):9.3f} {min(times):7.3f} {max(times):7.3f}")
    rows, heavy = import_profile(["-m", "kdcli", "check-recipe", "recipes/sst2-distill.json"], top=8)
    print("\nslowest top-level imports of check-recipe (cumulative ms):")
    for micros, module in rows:
        print(f"  {micros / 1000:7.1f}  {module}")
    print(f"\nheavy modules imported: {', '.join(heavy) if heavy else 'none (torch, transformers, datasets absent)'}")
    if heavy:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
