"""Forward+backward time of every kdcli loss, side by side with TextBrewer 0.2.1.

    .venv/bin/python bench/losses.py                  # batch 32, 12 heads, length 128, hidden 768
    .venv/bin/python bench/losses.py --repeats 21 --markdown
    .venv/bin/python bench/losses.py --only cos att_ce

Realistic sizes, fp32 on CPU: attention scores (B, H, L, L) carrying the additive -10000
padding mask, hidden states (B, L, D), a (B, L) mask with lengths spread over [L/2, L],
sequence-classification logits (B, 2). Each case times one forward and one backward of the
student input (the teacher side does not require grad, as in distillation), median of
`--repeats` runs after `--warmup` runs; kdcli and the reference alternate run by run so that
load on a shared machine hits both alike. The ratio is kdcli / reference (< 1: kdcli faster).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdcli import losses as kd_losses  # noqa: E402


@dataclass(frozen=True)
class Case:
    """One timed call: `function` of kdcli.losses / textbrewer.losses on prepared inputs."""

    label: str
    function: str
    make: Callable[[], tuple]  # -> (student inputs, teacher inputs, mask or None, kwargs)


@dataclass(frozen=True)
class Timing:
    label: str
    kdcli_ms: float
    reference_ms: float | None

    @property
    def ratio(self) -> float | None:
        return None if self.reference_ms is None else self.kdcli_ms / self.reference_ms


def make_cases(batch: int, heads: int, length: int, hidden: int, seed: int, device: str = "cpu") -> list[Case]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long().to(device)  # (B, L), int like HF
    additive = (1.0 - mask.float())[:, None, None, :] * -10000.0  # (B, 1, 1, L)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    def scores() -> torch.Tensor:
        return randn(batch, heads, length, length) + additive

    def states() -> torch.Tensor:
        return randn(batch, length, hidden)

    cases: list[Case] = []
    for fn, label in (
        ("att_mse_loss", "attention_mse"),
        ("att_mse_sum_loss", "attention_mse_sum"),
        ("att_ce_loss", "attention_ce"),
        ("att_ce_mean_loss", "attention_ce_mean"),
    ):
        for masked in (True, False):
            cases.append(
                Case(
                    f"{label}{' (mask)' if masked else ''}",
                    fn,
                    lambda masked=masked: ((scores(),), (scores(),), mask if masked else None, {}),
                )
            )
    for fn, label in (("hid_mse_loss", "hidden_mse"), ("cos_loss", "cos"), ("pkd_loss", "pkd")):
        for masked in (True, False):
            if fn == "pkd_loss" and masked:
                continue
            cases.append(
                Case(
                    f"{label}{' (mask)' if masked else ''}",
                    fn,
                    lambda masked=masked: ((states(),), (states(),), mask if masked else None, {}),
                )
            )
    for fn, label in (("fsp_loss", "fsp"), ("mmd_loss", "mmd")):
        for masked in (True, False):
            cases.append(
                Case(
                    f"{label}{' (mask)' if masked else ''}",
                    fn,
                    lambda masked=masked: (
                        ([states(), states()],),
                        ([states(), states()],),
                        mask if masked else None,
                        {},
                    ),
                )
            )
    for fn, label in (("kd_ce_loss", "ce"), ("kd_mse_loss", "mse")):
        cases.append(
            Case(f"{label} (T=4)", fn, lambda: ((randn(batch, 2),), (randn(batch, 2),), None, {"temperature": 4.0}))
        )
    return cases


def _leaves(x):
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for item in x for t in _leaves(item)]


_CLOCK = time.perf_counter
_SYNC: Callable[[], None] = lambda: None  # noqa: E731  (torch.cuda.synchronize on a GPU)


def _run_once(fn: Callable, student: tuple, teacher: tuple, mask, kwargs: dict) -> float:
    for t in _leaves(student):
        t.grad = None
    _SYNC()
    start = _CLOCK()
    args = (*student, *teacher) if kwargs else (*student, *teacher, mask)  # kd losses take no mask
    loss = fn(*args, **kwargs)
    loss.backward()
    _SYNC()
    return _CLOCK() - start


def time_case(case: Case, reference, repeats: int, warmup: int, stat: Callable = statistics.median) -> Timing:
    student, teacher, mask, kwargs = case.make()
    for t in _leaves(student):
        t.requires_grad_(True)
    ours = getattr(kd_losses, case.function)
    theirs = getattr(reference, case.function) if reference is not None else None
    ours_s: list[float] = []
    theirs_s: list[float] = []
    for i in range(warmup + repeats):
        a = _run_once(ours, student, teacher, mask, kwargs)
        b = _run_once(theirs, student, teacher, mask, kwargs) if theirs is not None else None
        if i >= warmup:
            ours_s.append(a)
            if b is not None:
                theirs_s.append(b)
    return Timing(case.label, stat(ours_s) * 1e3, stat(theirs_s) * 1e3 if theirs_s else None)


def render(timings: list[Timing], markdown: bool) -> str:
    head = ("loss", "kdcli ms", "reference ms", "ratio")
    rows = [
        (
            t.label,
            f"{t.kdcli_ms:.2f}",
            "-" if t.reference_ms is None else f"{t.reference_ms:.2f}",
            "-" if t.ratio is None else f"{t.ratio:.2f}",
        )
        for t in timings
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * 3) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    fmt = lambda r: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, help="labels starting with these words")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="summary of the repeats (min is steadier on a busy machine)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or this process's CPU time (less disturbed by other load; use with --threads 1)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (the goal's setting) or cuda")
    args = parser.parse_args(argv)
    global _CLOCK, _SYNC
    _CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    if args.device.startswith("cuda"):
        _SYNC = torch.cuda.synchronize

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import textbrewer.losses as reference
    except ImportError:
        reference = None
        print("textbrewer is not installed: timing kdcli only", file=sys.stderr)

    cases = make_cases(args.batch, args.heads, args.length, args.hidden, args.seed, args.device)
    if args.only:
        cases = [c for c in cases if any(c.label.startswith(o) for o in args.only)]
    print(
        f"# forward+backward, fp32 {args.device}, B={args.batch} H={args.heads} L={args.length} D={args.hidden}, "
        f"{args.stat} {args.clock} time of {args.repeats}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else platform.processor() or platform.machine()}"
    )
    stat = statistics.median if args.stat == "median" else min
    timings = [time_case(case, reference, args.repeats, args.warmup, stat) for case in cases]
    print(render(timings, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
