"""What a run tells the user: progress on stderr, `metrics.jsonl`, TensorBoard, the summary.

- `Progress`: a rich progress bar on stderr (step, epoch, total and per-term losses, lr,
  samples/s, ETA) when stderr is a terminal, one plain line per log step when it is not,
  nothing when quiet.
- `MetricsLog`: `metrics.jsonl`, one JSON object per log step (and per evaluation), flushed
  as written; on resume the lines after the checkpoint's step are dropped first, and an
  evaluation already logged at a step is not logged again.
- `Throughput`: samples/s and the ETA from the session's average rate (stable when
  consecutive log windows differ, as they do under length grouping).
- `TensorBoard`: scalars to TensorBoard event files when `torch.utils.tensorboard` imports.
- `summary_table`: the final summary as a rich table for the CLI.
- `peak_memory_mb`: peak RSS on CPU, peak allocated memory on CUDA.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.table import Table

from kdcli.run_files.checkpoint import atomic_write_text

ProgressMode = Literal["rich", "plain", "off"]


def progress_mode(quiet: bool, stream=None) -> ProgressMode:
    """ "off" when quiet, "rich" when the stream (default stderr) is a terminal, else "plain"."""
    if quiet:
        return "off"
    stream = stream if stream is not None else sys.stderr
    return "rich" if getattr(stream, "isatty", lambda: False)() else "plain"


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_terms(loss: float, terms: dict[str, float]) -> str:
    parts = [f"loss {loss:.4g}"]
    parts += [f"{name} {value:.4g}" for name, value in terms.items()]
    return "  ".join(parts)


@dataclass
class StepInfo:
    """One log step's numbers, as the progress display and metrics.jsonl show them."""

    step: int
    total_steps: int
    epoch: float  # fractional epoch, e.g. 1.25
    loss: float
    terms: dict[str, float]
    lr: float
    samples_per_s: float
    eta_s: float
    weights: dict[str, float] = field(default_factory=dict)
    #: causal-lm: real (non-padding) tokens per second and the peak memory so far
    tokens_per_s: float | None = None
    memory_mb: float | None = None

    def line(self) -> str:
        rate = f"{self.samples_per_s:.1f} samples/s"
        if self.tokens_per_s is not None:
            rate += f"  {self.tokens_per_s:.0f} tokens/s"
        if self.memory_mb is not None:
            rate += f"  mem {self.memory_mb:.0f} MiB"
        return (
            f"step {self.step}/{self.total_steps}  epoch {self.epoch:.2f}  "
            f"{format_terms(self.loss, self.terms)}  lr {self.lr:.3g}  "
            f"{rate}  eta {format_duration(self.eta_s)}"
        )

    def record(self) -> dict:
        return {
            "step": self.step,
            "epoch": round(self.epoch, 4),
            "loss": self.loss,
            **{f"loss/{k}": v for k, v in self.terms.items()},
            **{f"weight/{k}": v for k, v in self.weights.items()},
            "lr": self.lr,
            "samples_per_s": round(self.samples_per_s, 3),
            **({"tokens_per_s": round(self.tokens_per_s, 1)} if self.tokens_per_s is not None else {}),
            **({"memory_mb": round(self.memory_mb, 1)} if self.memory_mb is not None else {}),
        }


class Progress:
    """The progress display on stderr; `mode` from `progress_mode()`."""

    def __init__(self, mode: ProgressMode, total_steps: int, *, initial_step: int = 0, description: str = "distill"):
        self.mode = mode
        self.total_steps = total_steps
        self._console = Console(stderr=True)
        self._bar = None
        self._task = None
        if mode == "rich":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )
            from rich.text import Text

            class BarWithInfo(RichProgress):
                """The bar on one line, the latest losses under it (wrapped, never cut)."""

                info = ""

                def get_renderables(self):
                    yield self.make_tasks_table(self.tasks)
                    if self.info:
                        yield Text(self.info, overflow="fold")

            self._bar = BarWithInfo(
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=30),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self._console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(description, total=total_steps, completed=initial_step)

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def show(self, info: StepInfo) -> None:
        if self._bar is not None:
            self._bar.info = (
                f"epoch {info.epoch:.2f}  {format_terms(info.loss, info.terms)}  "
                f"lr {info.lr:.3g}  {info.samples_per_s:.1f} samples/s"
            )
            self._bar.update(self._task, completed=info.step)
        elif self.mode == "plain":
            print(info.line(), file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        """A line of its own (evaluation results, checkpoints, warnings)."""
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        elif self.mode == "rich":
            self._console.print(text, markup=False, highlight=False)
        elif self.mode == "plain":
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, appended and flushed as the run goes.

    With `resume_step`, the lines logged after that step (by a run that went on past its
    last checkpoint), training and evaluation alike, are dropped first, so the file reads as
    one uninterrupted run; an evaluation at a step that already has one (a finished run
    resumed evaluates its last step again) is not written twice.
    """

    def __init__(self, path: Path, *, resume_step: int | None = None):
        self.path = Path(path)
        self._evaluated: set[int] = set()  # steps with an evaluation line
        if resume_step is not None and self.path.exists():
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if isinstance(record, dict) and record.get("step", 0) <= resume_step:
                    kept.append(line)
                    if _is_eval(record):
                        self._evaluated.add(record.get("step", 0))
            atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if _is_eval(record):
            if record.get("step") in self._evaluated:
                return
            self._evaluated.add(record.get("step"))
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _is_eval(record: dict) -> bool:
    return any(key.startswith("eval/") for key in record)


class TensorBoard:
    """Scalars to TensorBoard event files under `log_dir`; a no-op when tensorboard is absent."""

    def __init__(self, log_dir: Path):
        self._writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed (or broken): no events, no error
            return
        self._writer = SummaryWriter(log_dir=str(log_dir))

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def add(self, step: int, scalars: dict[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in scalars.items():
            if isinstance(value, (int, float)) and name not in ("step", "epoch"):
                self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()


class Throughput:
    """Samples/s and an ETA for the remaining steps, both from the average over this session
    (since the run started or resumed). The last window's instant rate swings with the batch
    lengths (length grouping alternates short and long batches), and the ETA with it."""

    def __init__(self, step: int = 0):
        self.start = time.perf_counter()
        self._samples = 0
        self._tokens = 0
        self._step = step

    def add(self, samples: int, tokens: int = 0) -> None:
        self._samples += samples
        self._tokens += tokens

    def read(self, step: int, total_steps: int) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self._samples / elapsed
        eta = (total_steps - step) * elapsed / max(step - self._step, 1)
        return rate, eta

    def tokens_per_s(self) -> float:
        """Real (non-padding) tokens per second over this session."""
        return self._tokens / max(time.perf_counter() - self.start, 1e-9)


def peak_memory_mb(device_type: str = "cpu") -> float:
    """Peak memory of this process in MiB: CUDA peak allocated on GPU, peak RSS on CPU."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def summary_table(summary: dict, title: str = "kdcli run") -> Table:
    """The run summary as a two-column rich table (nested dicts flattened with '.')."""
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("field")
    table.add_column("value", overflow="fold")

    def rows(prefix: str, doc: dict):
        for key, value in doc.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                yield from rows(name + ".", value)
            else:
                yield name, _fmt(value)

    for name, value in rows("", summary):
        table.add_row(name, value)
    return table
