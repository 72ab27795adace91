"""GPU check: kdcli's attention capture and `kdcli.distill.run` on CUDA, in every precision.

    python bench/gpu_check.py --out runs/gpu                        # on a CUDA machine (< 6 min on an H100)
    python bench/gpu_check.py --out /tmp/g --device cpu --steps 3 --quick   # CPU dry run of the whole script

How the GPU figures in the docs were made. The machine has no network and no model weights, so
the teachers are **random** models of real shapes, built from config.json with a fixed seed and
written with `save_pretrained` (the real `from_pretrained` path reads them back):

* "minilm": the shape of all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 12 heads, vocab 30522),
  config and tokenizer from `--model-dir` (default `.gpu/minilm-shape/`: config.json and the
  tokenizer files of the packaged model, no weights); 2-way head drawn from N(0, 0.5) so the
  teacher's logits are not all near 0 (as bench/distill.py does).
* "bert-base": the same config with `BERT_BASE` sizes (12 layers, hidden 768, 12 heads,
  intermediate 3072), same vocabulary and tokenizer.

Parts (each one's exception is caught and recorded; the script goes on):

1. environment: python/torch/CUDA/GPU, bf16 support, versions and locations of the packages.
2. attention: kdcli's captured pre-softmax scores (`features.FeatureCapture`) against the eager
   implementation's `attentions`: max |softmax(scores) - attentions| over every block of the
   minilm-shape model (query/key weights scaled x5 so the attention is far from uniform), in
   fp32 and under bf16 autocast, captured on the eager model itself and on the default (SDPA)
   model with the same weights.
3. distill runs through the public API (`recipe.load_recipe` on a recipe written to a temp dir,
   then `distill.run`) for `--steps` optimizer steps: the shipped SST-2 rows
   (recipes/data/sst2/train.tsv, first steps x 32 rows; dev.tsv for the final eval), max_length
   64, batch 32, the objective of recipes/sst2-distill.json (KD ce at T=8 + hidden_mse + mmd on
   hidden pairs (0,0), (2,1), (4,2), (6,3)); student = the teacher's config with 3 layers
   initialised from teacher blocks 2, 4, 6. Variants: precision auto (bf16 on an H100), fp16
   (GradScaler), fp32, bf16 + attention_mse on blocks (2,1), (4,2), (6,3), and the bert-base
   teacher at bf16 (student 6 layers from blocks 2, 4, ..., 12; hidden pairs (0,0), (4,2),
   (8,4), (12,6)). Reported per run: samples/s (kdcli's summary, whole training time, and steady
   state: optimizer steps after a warm-up, stamped by a global optimizer-step hook), peak GPU
   memory (summary.json's `peak_memory_mb`: CUDA peak allocated, reset before each run), the
   final loss terms and whether they are finite, and the wall time of the `run` call.

Results: `--out/gpu_check.json` (rewritten after every part, so a timed-out run keeps what it
finished) and a table on stdout. `--budget-s` skips the parts that would start after it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "recipes" / "data" / "sst2"
MODEL_DIR = ROOT / ".gpu" / "minilm-shape"
BATCH = 32
MAX_LENGTH = 64
TEMPERATURE = 8.0
SEED = 0
BERT_BASE = {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072}
#: --quick: tiny widths (the layer counts stay, so the matches are the real ones).
QUICK_WIDTH = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}
PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "pydantic",
    "pydantic_core",
    "pyarrow",
    "numpy",
    "pandas",
    "fsspec",
    "dill",
    "multiprocess",
    "huggingface_hub",
    "typer",
    "rich",
    "safetensors",
    "tensorboard",
    "typing_extensions",
    "kdcli",
)


# --- results ---------------------------------------------------------------------------


@dataclass
class Part:
    """One part's outcome: status "ok", "error" or "skipped", its figures, and the error."""

    name: str
    status: str = "ok"
    seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None


class PartFailed(Exception):
    """A part that found a problem but still has figures to keep (`result`)."""

    def __init__(self, message: str, result: dict) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class Report:
    argv: list[str]
    started: str
    parts: list[Part] = field(default_factory=list)
    elapsed_s: float = 0.0

    def write(self, out: Path) -> Path:
        path = out / "gpu_check.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, default=str), encoding="utf-8")
        tmp.replace(path)
        return path


def attempt(report: Report, name: str, fn: Callable[[], dict], out: Path, t0: float, budget_s: float) -> Part:
    """Run one part, record its result or its exception, write the report; never raises
    (except KeyboardInterrupt)."""
    part = Part(name)
    start = time.perf_counter()
    if start - t0 > budget_s:
        part.status, part.error = "skipped", f"time budget of {budget_s:.0f} s spent"
    else:
        print(f"\n=== {name}", flush=True)
        try:
            part.result = fn()
        except PartFailed as exc:
            part.status, part.error, part.result = "error", str(exc), exc.result
            print(f"    ERROR {exc}", flush=True)
        except Exception as exc:  # every failure is a finding, never the end of the check
            part.status = "error"
            part.error = f"{type(exc).__name__}: {exc}"[:2000]
            part.traceback = "".join(traceback.format_exception(exc)[-12:])[-4000:]
            print(f"    ERROR {part.error.splitlines()[0] if part.error else ''}", flush=True)
    part.seconds = round(time.perf_counter() - start, 2)
    report.parts.append(part)
    report.elapsed_s = round(time.perf_counter() - t0, 1)
    report.write(out)
    return part


# --- part 1: environment ---------------------------------------------------------------


def environment(device: str) -> dict:
    import importlib
    import importlib.metadata

    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "requested_device": device,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            bf16_supported=torch.cuda.is_bf16_supported(),
            float32_matmul_precision=torch.get_float32_matmul_precision(),
        )
    packages = {}
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
            try:
                version = importlib.metadata.version(name.replace("_", "-"))
            except importlib.metadata.PackageNotFoundError:
                version = getattr(module, "__version__", "?")
            packages[name] = f"{version} @ {Path(module.__file__).parent}"
        except Exception as exc:
            packages[name] = f"MISSING ({type(exc).__name__}: {str(exc)[:200]})"
    info["packages"] = packages
    for key in ("gpu", "capability", "gpu_memory_gib", "bf16_supported"):
        if key in info:
            print(f"    {key}: {info[key]}")
    print(f"    cuda_available: {info['cuda_available']} (torch {torch.__version__}, cuda {torch.version.cuda})")
    for name, where in packages.items():
        print(f"    {name:18} {where}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PartFailed("CUDA is not available on this machine (the distill runs will fail too)", info)
    return info


# --- models ----------------------------------------------------------------------------


def teacher_config(model_dir: Path, sizes: dict | None, quick: bool):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, num_labels=2)
    for key, value in {**(sizes or {}), **(QUICK_WIDTH if quick else {})}.items():
        setattr(config, key, value)
    return config


def build_teacher(directory: Path, model_dir: Path, sizes: dict | None, quick: bool) -> Path:
    """A random BERT of `model_dir`'s config (plus `sizes`) with a 2-way head, saved with its
    tokenizer; the weights depend only on the arguments (global RNG untouched)."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    config = teacher_config(model_dir, sizes, quick)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = BertForSequenceClassification(config)
        torch.nn.init.normal_(model.classifier.weight, std=0.5)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(directory)
    del model
    return directory


# --- part 2: attention capture against eager attentions ---------------------------------


def first_rows(path: Path, n: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        header = next(f).rstrip("\n").split("\t")
        col = header.index("sentence")
        return [next(f).rstrip("\n").split("\t")[col] for _ in range(n)]


def attention_check(teacher_dir: Path, device: str) -> dict:
    import torch
    from torch import nn
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kdcli.features import FeatureCapture

    dev = torch.device(device)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    texts = first_rows(DATA_DIR / "dev.tsv", BATCH)
    batch = tokenizer(texts, padding="longest", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    batch = {k: v.to(dev) for k, v in batch.items()}

    def load(impl: str) -> nn.Module:
        model = AutoModelForSequenceClassification.from_pretrained(teacher_dir, attn_implementation=impl)
        with torch.no_grad():  # sharper attention than a 0.02-std init gives (near uniform)
            for name, module in model.named_modules():
                if isinstance(module, nn.Linear) and name.endswith(("query", "key")):
                    module.weight.mul_(5.0)
        return model.to(dev).eval()

    eager, sdpa = load("eager"), load("sdpa")
    blocks = list(range(1, eager.config.num_hidden_layers + 1))
    result: dict[str, Any] = {
        "batch": list(batch["input_ids"].shape),
        "padded_share": round(1 - batch["attention_mask"].float().mean().item(), 3),
    }
    for precision in ("fp32", "bf16"):
        if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            result[precision] = "bf16 not supported"
            continue
        ctx = (
            torch.autocast(dev.type, dtype=torch.bfloat16)
            if precision == "bf16"
            else torch.autocast(dev.type, enabled=False)
        )
        with torch.no_grad(), ctx:
            reference = eager(**batch, output_attentions=True).attentions
            if reference is None:
                raise RuntimeError("the eager model returned no attentions")
            for impl, model in (("eager", eager), ("sdpa", sdpa)):
                with FeatureCapture(model, attention_layers=blocks, role=impl) as capture:
                    feats = capture.run(batch)
                diffs = [
                    (torch.softmax(feats.scores[b].float(), dim=-1) - reference[b - 1].float()).abs().max().item()
                    for b in blocks
                ]
                result[f"{precision}/{impl}"] = {
                    "scores_dtype": str(feats.scores[blocks[0]].dtype),
                    "max_abs_diff": max(diffs),
                    "per_block": [float(f"{d:.3g}") for d in diffs],
                }
                print(
                    f"    {precision:5} capture on {impl:5} vs eager attentions: max |diff| {max(diffs):.3g}  "
                    f"(scores {feats.scores[blocks[0]].dtype})"
                )
        result[f"{precision}/mean_row_max_prob"] = round(
            statistics.fmean(a.float().amax(-1).mean().item() for a in reference), 4
        )
    del eager, sdpa
    return result


# --- part 3: distill runs --------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    teacher: str  # "minilm" or "bert-base"
    precision: str
    student_layers: tuple[int, ...]  # 1-based teacher blocks the student's blocks start from
    hidden_pairs: tuple[tuple[int, int], ...]
    attention_pairs: tuple[tuple[int, int], ...] = ()


MINILM_HIDDEN = ((0, 0), (2, 1), (4, 2), (6, 3))
VARIANTS = (
    Variant("minilm auto", "minilm", "auto", (2, 4, 6), MINILM_HIDDEN),
    Variant("minilm fp16", "minilm", "fp16", (2, 4, 6), MINILM_HIDDEN),
    Variant("minilm fp32", "minilm", "fp32", (2, 4, 6), MINILM_HIDDEN),
    Variant("minilm bf16+att", "minilm", "bf16", (2, 4, 6), MINILM_HIDDEN, ((2, 1), (4, 2), (6, 3))),
    Variant("bert-base bf16", "bert-base", "bf16", (2, 4, 6, 8, 10, 12), ((0, 0), (4, 2), (8, 4), (12, 6))),
)


def recipe_for(variant: Variant, teacher: Path, output_dir: Path, device: str, steps: int, quick: bool) -> dict:
    """The recipe of one run (the objective of recipes/sst2-distill.json; kdcli's defaults
    for the optimizer: lr 1e-4, warm-up 10 %, weight decay 0.01, clipping at 1.0)."""
    matches = []
    for t, s in variant.hidden_pairs:
        matches.append({"layer_T": t, "layer_S": s, "feature": "hidden", "loss": "hidden_mse", "weight": 1})
    for t, s in variant.hidden_pairs:
        matches.append({"layer_T": [t, t], "layer_S": [s, s], "feature": "hidden", "loss": "mmd", "weight": 1})
    for t, s in variant.attention_pairs:
        matches.append({"layer_T": t, "layer_S": s, "feature": "attention", "loss": "attention_mse", "weight": 1})
    return {
        "description": f"bench/gpu_check.py: {variant.name}",
        "teacher": {"model": str(teacher)},
        "student": {
            "config": str(teacher),
            "overrides": {"num_hidden_layers": len(variant.student_layers)},
            "init_from_teacher": list(variant.student_layers),
        },
        "task": "sequence-classification",
        "data": {
            "train": {"path": str(DATA_DIR / "train.tsv"), "format": "tsv"},
            "eval": {"path": str(DATA_DIR / "dev.tsv"), "format": "tsv"},
            "text_column": "sentence",
            "label_column": "label",
            "max_length": MAX_LENGTH,
            "max_train_samples": steps * BATCH,
            **({"max_eval_samples": 64} if quick else {}),
        },
        "training": {
            "num_steps": steps,
            "batch_size": BATCH,
            "learning_rate": 1e-4,
            "device": device,
            "precision": variant.precision,
            "log_every": max(1, min(10, steps)),
            "output_dir": str(output_dir),
        },
        "distillation": {
            "temperature": TEMPERATURE,
            "kd_loss_type": "ce",
            "kd_loss_weight": 1,
            "hard_label_weight": 0,
            "intermediate_matches": matches,
        },
    }


class StepClock:
    """Stamps every optimizer step (a global post-step hook; GradScaler-skipped steps are not
    stamped, which `stamped_steps` against `steps` shows)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self._handle = None

    def __enter__(self) -> StepClock:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handle = register_optimizer_step_post_hook(lambda *_: self.stamps.append(time.perf_counter()))
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def steady(self, warmup: int) -> dict:
        """Samples/s and median step time over the steps after `warmup` stamped ones."""
        gaps = [b - a for a, b in zip(self.stamps[warmup:], self.stamps[warmup + 1 :])]
        if not gaps:
            return {"steady_samples_per_s": None, "median_step_ms": None, "timed_steps": 0}
        return {
            "steady_samples_per_s": round(len(gaps) * BATCH / sum(gaps), 1),
            "median_step_ms": round(1000 * statistics.median(gaps), 2),
            "timed_steps": len(gaps),
        }


def distill_run(variant: Variant, teacher: Path, work: Path, device: str, steps: int, quick: bool) -> dict:
    import torch

    from kdcli.distill import run
    from kdcli.recipe import load_recipe

    out = work / "runs" / variant.name.replace(" ", "-").replace("+", "_")
    recipe_path = work / "recipes" / f"{out.name}.json"
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(
        json.dumps(recipe_for(variant, teacher, out, device, steps, quick), indent=2), encoding="utf-8"
    )
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    recipe = load_recipe(recipe_path)
    start = time.perf_counter()
    try:
        with StepClock() as clock:
            returned = run(recipe, overwrite=True, quiet=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        summary_file = out / "summary.json"
        summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else returned
        terms = summary.get("final_terms") or {}
        values = [summary.get("final_loss"), *terms.values()]
        result = {
            "precision": summary.get("precision"),
            "device": summary.get("device"),
            "steps": summary.get("steps"),
            "stamped_steps": len(clock.stamps),
            "samples_per_s": summary.get("samples_per_s"),
            **clock.steady(warmup=min(10, max(1, steps // 3))),
            "peak_memory_mb": summary.get("peak_memory_mb"),
            "peak_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20, 1)
            if torch.cuda.is_available()
            else None,
            "final_loss": summary.get("final_loss"),
            "final_terms": terms,
            "finite": all(isinstance(v, (int, float)) and math.isfinite(v) for v in values),
            "eval": summary.get("eval"),
            "student_parameters": summary.get("student_parameters"),
            "train_time_s": summary.get("train_time_s"),
            "run_wall_s": round(wall, 2),
            "warnings": summary.get("warnings"),
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)  # checkpoints: hundreds of MB for bert-base
    print(
        f"    {result['precision']}: {result['steady_samples_per_s']} samples/s steady "
        f"({result['samples_per_s']} whole run), peak {result['peak_memory_mb']} MiB, "
        f"loss {_num(result['final_loss'])}, finite {result['finite']}, wall {result['run_wall_s']} s"
    )
    print("    terms: " + "  ".join(f"{k} {_num(v)}" for k, v in terms.items()))
    return result


# --- the table -------------------------------------------------------------------------


def _num(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def table(report: Report) -> str:
    head = f"{'part':22} {'status':7} {'prec':5} {'steady/s':>9} {'run/s':>8} {'step ms':>8} {'peak MiB':>9} {'loss':>9} {'finite':6} {'wall s':>7}"
    lines = [head, "-" * len(head)]
    for p in report.parts:
        r = p.result
        if "final_loss" in r:
            lines.append(
                f"{p.name:22} {p.status:7} {str(r['precision']):5} {str(r['steady_samples_per_s']):>9} "
                f"{str(r['samples_per_s']):>8} {str(r['median_step_ms']):>8} {str(r['peak_memory_mb']):>9} "
                f"{_num(r['final_loss']):>9} {str(r['finite']):6} {r['run_wall_s']:>7}"
            )
        elif p.name == "attention" and p.status == "ok":
            diffs = "  ".join(f"{k} {v['max_abs_diff']:.2g}" for k, v in r.items() if isinstance(v, dict))
            lines.append(f"{p.name:22} {p.status:7} max|softmax(scores)-eager|: {diffs}")
        else:
            note = (p.error or "").splitlines()[0][:90] if p.error else ""
            lines.append(f"{p.name:22} {p.status:7} {note}  ({p.seconds} s)")
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (dry run)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per distill run")
    parser.add_argument("--quick", action="store_true", help="tiny widths (hidden 64) for a CPU dry run")
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR, help="config.json + tokenizer of the minilm shape")
    parser.add_argument("--budget-s", type=float, default=320.0, help="start no part after this many seconds")
    parser.add_argument("--only", nargs="*", default=None, help="run only the parts whose names contain one of these")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kdcli-gpu-check-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", str(work / "hf-datasets"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Loading weights" bars in the log
    sys.path.insert(0, str(ROOT))  # kdcli travels as a source tree
    report = Report(argv=sys.argv, started=time.strftime("%Y-%m-%d %H:%M:%S"))

    def wanted(name: str) -> bool:
        return args.only is None or any(word in name for word in args.only)

    def step(name: str, fn: Callable[[], dict]) -> Part:
        return attempt(report, name, fn, args.out, t0, args.budget_s)

    try:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except Exception:  # a missing transformers shows up in the environment part
            pass
        step("environment", lambda: environment(args.device))
        teachers: dict[str, Path] = {}

        def build(kind: str) -> dict:
            sizes = BERT_BASE if kind == "bert-base" else None
            start = time.perf_counter()
            teachers[kind] = build_teacher(work / f"teacher-{kind}", args.model_dir, sizes, args.quick)
            config = teacher_config(args.model_dir, sizes, args.quick)
            return {
                "dir": str(teachers[kind]),
                "seconds": round(time.perf_counter() - start, 2),
                **{
                    k: getattr(config, k)
                    for k in (
                        "num_hidden_layers",
                        "hidden_size",
                        "num_attention_heads",
                        "intermediate_size",
                        "vocab_size",
                    )
                },
            }

        step("build minilm", lambda: build("minilm"))
        if "minilm" in teachers and wanted("attention"):
            step("attention", lambda: attention_check(teachers["minilm"], args.device))
        for variant in VARIANTS:
            if not wanted(variant.name):
                continue
            if variant.teacher not in teachers:
                step(f"build {variant.teacher}", lambda variant=variant: build(variant.teacher))
            if variant.teacher in teachers:
                step(
                    variant.name,
                    lambda variant=variant: distill_run(
                        variant, teachers[variant.teacher], work, args.device, args.steps, args.quick
                    ),
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        report.elapsed_s = round(time.perf_counter() - t0, 1)
        path = report.write(args.out)
        print("\n" + table(report))
        print(
            f"\n{sum(p.status == 'ok' for p in report.parts)}/{len(report.parts)} parts ok in {report.elapsed_s} s; results in {path}"
        )
    return 0 if all(p.status == "ok" for p in report.parts) else 1


if __name__ == "__main__":
    sys.exit(main())
