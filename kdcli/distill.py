"""The loop: `kdcli distill` and `kdcli train`, on one device or under torchrun.

`run()` reads top to bottom, nanoGPT-style:

    setup     processes, output folder, seed, device, precision, tokenizer, data, models,
              objective, optimizer (AdamW; no decay on biases/LayerNorm; projections in their
              own groups), linear warm-up then decay, GradScaler, resume
    loop      per optimizer step: for each micro-batch (gradient accumulation) the teachers
              (eval, inference_mode, or the logit cache), the student + objective, backward;
              then the non-finite / Ctrl-C checks, clipping (student + projections), the
              optimizer and scheduler step; log, evaluate and checkpoint every N steps
    finish    final evaluation, checkpoint, the student (save_pretrained + tokenizer),
              projections.safetensors, summary.json

Output folder (`kdcli.outdir`): checked, created, probed for writing and locked (rank 0)
before anything loads; with --overwrite the previous run is cleared only just before the
first write, so a run that fails while loading leaves it intact. A full disk while saving is
one message with the space needed; the last good checkpoint is kept. Resuming with another
`training.learning_rate` continues the schedule at the new rate.

Data parallel: under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the
process group is initialised (gloo on CPU, nccl on CUDA), the student and the objective's
projections are wrapped together in one DistributedDataParallel (the teachers never are),
every rank takes its own share of each global batch (`data.train_batches`), and rank 0 alone
evaluates and writes files and progress. `training.batch_size` is the batch per process.

Teacher-logit caching (`is_caching_logits`): each example's teacher logits are computed the
first time the example is seen and kept on the CPU, keyed by its row in the training set, so
the cache works with shuffling, length grouping, `num_steps` and resuming (the reference
refuses `num_steps` and fixes its batches). Intermediate matches need the teacher's hidden
states or attention scores on every step, so with matches the cache would save nothing: it is
then switched off with a warning.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shlex
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from kdcli import checkpoint as ckpt
from kdcli import data as kdata
from kdcli import models as kmodels
from kdcli import outdir, report
from kdcli.errors import Interrupted, NonFiniteLossError, RunError, UsageError
from kdcli.features import FeatureCapture, Features, model_inputs
from kdcli.objective import Objective
from kdcli.recipe import PretrainedModel

Mode = Literal["distill", "train"]
PROJECTIONS_FILE = "projections.safetensors"
#: Files and folders a run writes into its output folder (besides the model's own files).
RUN_FILES = ("metrics.jsonl", "summary.json", "recipe.json", PROJECTIONS_FILE, "tensorboard", ckpt.CHECKPOINTS)


# ---------------------------------------------------------------------------------------------
# Processes, devices, precision
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Processes:
    """This process's place in a torchrun job (rank 0 of 1 when run directly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Processes":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def is_main_process() -> bool:
    """False on every torchrun worker but rank 0 (which alone prints results)."""
    return Processes.from_env().is_main


def resolve_device(name: str, procs: Processes) -> torch.device:
    """"auto" -> cuda, then mps, then cpu; under torchrun on CUDA each rank takes cuda:LOCAL_RANK."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r}: no CUDA GPU is available here. Fix: use --device cpu or auto")
        if procs.distributed:
            name = f"cuda:{procs.local_rank}"
        device = torch.device(name)
        if device.index is None:  # plain "cuda": the current device, with its index made explicit
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s). Fix: pick one of them")
        torch.cuda.set_device(device)
        return device
    if name == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise UsageError("device 'mps': Apple's GPU backend is not available here. Fix: use --device cpu or auto")
        if procs.distributed:
            raise UsageError("several processes on mps are not supported. Fix: run one process, or use CUDA")
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(name: str, device: torch.device) -> str:
    """"auto" -> bf16 autocast on GPUs that support it, fp16 (+ GradScaler) on other GPUs,
    fp32 on CPU and mps."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if name == "fp16" and device.type != "cuda":
        raise UsageError(f"precision fp16 needs a CUDA GPU (device is {device}). Fix: use fp32 or bf16")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("precision bf16: this GPU does not support bfloat16. Fix: use fp16 or auto")
    return name


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Output folder
# ---------------------------------------------------------------------------------------------


def read_paths(recipe) -> list[Path]:
    """Every local path the run reads (the recipe, its data, models, student config, tokenizer),
    which `--overwrite` must never delete. A relative reference (a recipe built in code) is
    taken relative to the recipe's folder, as recipes resolve them, and to the working folder,
    as `from_pretrained` and the data readers would read it; each one that exists counts."""
    data = recipe.data
    refs = [
        recipe.source, data.train.path, data.eval.path if data.eval is not None else None,
        *[t.model for t in recipe.teachers], getattr(recipe.student, "model", None),
        getattr(recipe.student, "config", None), recipe.tokenizer, recipe.init_source,
    ]
    bases = ([Path(recipe.source).parent] if recipe.source else []) + [Path.cwd()]
    paths: list[Path] = []
    for ref in refs:
        if not ref:
            continue
        ref = os.path.expanduser(str(ref))
        if os.path.isabs(ref):
            paths.append(Path(ref))
        else:
            paths += [base / ref for base in bases if os.path.lexists(base / ref)]
    return paths


def recipe_sha256(recipe) -> str:
    """The hash of the recipe file (or, for a recipe built in code, of its JSON)."""
    if recipe.source is not None:
        data = Path(recipe.source).read_bytes()
    else:
        data = recipe.model_dump_json(by_alias=True).encode()
    return hashlib.sha256(data).hexdigest()


def resume_command(mode: Mode, recipe, out: Path, procs: Processes, *, max_steps, device, seed) -> str:
    """The exact command that continues this run."""
    parts = ["kdcli", mode, str(recipe.source) if recipe.source else "RECIPE", "--output-dir", str(out), "--resume"]
    if max_steps is not None:
        parts += ["--max-steps", str(max_steps)]
    if device is not None:
        parts += ["--device", device]
    if seed is not None:
        parts += ["--seed", str(seed)]
    if procs.distributed:
        parts = ["torchrun", "--nproc-per-node", str(procs.world_size), "-m"] + parts
    return shlex.join(parts)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def load_models(recipe, mode: Mode, labels: kdata.Labels, warn: Callable[[str], None]):
    """The teachers (eval mode, frozen) and the student, for the recipe's task and labels."""
    task = recipe.task
    id2label = labels.id2label
    teachers = []
    if mode == "distill":
        kd = recipe.distillation  # a teacher whose logits are used must have a head of the data's size
        uses_logits = kd.kd_loss_weight > 0 or kd.kd_loss_weight_scheduler != "none"
        for i, ref in enumerate(recipe.teachers):
            loaded = kmodels.load_model(
                ref.model, task, id2label=id2label, revision=ref.revision,
                trust_remote_code=ref.trust_remote_code, role="teacher",
                resize_head=not uses_logits, warn=warn,
            )
            if loaded.new_head:
                warn(
                    f"warning: teacher {ref.model} has no trained {labels.num_labels}-way head (a new "
                    "one was initialised at random), so its logits teach nothing. Fine-tune it first "
                    "with `kdcli train`"
                )
            teachers.append(loaded.model.eval().requires_grad_(False))
    student_ref = recipe.student
    if isinstance(student_ref, PretrainedModel):
        loaded = kmodels.load_model(
            student_ref.model, task, id2label=id2label, revision=student_ref.revision,
            trust_remote_code=student_ref.trust_remote_code, role="student", warn=warn,
        )
        return teachers, loaded.model
    init_from, layers = None, student_ref.init_from_teacher
    if layers is not None:
        if teachers:
            init_from = teachers[0]
        else:  # train mode: copy from the model the student's config comes from
            init_from = kmodels.load_model(
                recipe.init_source, task, id2label=id2label, revision=student_ref.revision,
                trust_remote_code=student_ref.trust_remote_code, role="student.config", warn=warn,
            ).model
    student = kmodels.build_student(
        student_ref.config, student_ref.overrides, task, labels.num_labels, id2label,
        init_from=init_from, init_layers=layers, revision=student_ref.revision,
        trust_remote_code=student_ref.trust_remote_code, warn=warn,
    )
    return teachers, student


def tokenizer_ref(recipe) -> tuple[str, str | None, bool]:
    """(reference, revision, trust_remote_code) of the tokenizer: the recipe's `tokenizer`,
    else the first teacher's, else the student's model (or config)."""
    if recipe.tokenizer:
        return recipe.tokenizer, None, False
    if recipe.teachers:
        t = recipe.teachers[0]
        return t.model, t.revision, t.trust_remote_code
    s = recipe.student
    return (getattr(s, "model", None) or s.config), s.revision, s.trust_remote_code


def param_groups(student: nn.Module, objective: Objective, weight_decay: float) -> list[dict]:
    """AdamW groups: decayed matrices; biases, LayerNorm and other 1-D weights without decay;
    then one group per projection with its `proj[3]` options."""
    decay, no_decay = [], []
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        lowered = name.lower()
        if p.ndim < 2 or lowered.endswith("bias") or "layernorm" in lowered or "layer_norm" in lowered:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]] + objective.projection_param_groups()


def make_optimizer(groups: list[dict], training) -> torch.optim.AdamW:
    """AdamW with the fused kernel where the device has one (CPU and CUDA: about 5x faster
    than the per-tensor loop on a BERT's embedding matrix), else the default implementation."""
    kwargs = {"lr": training.learning_rate, "weight_decay": training.weight_decay}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device without a fused AdamW
        return torch.optim.AdamW(groups, **kwargs)


def linear_warmup_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """lr factor: linear from 0 to 1 over `warmup_steps`, then linear down to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def follow_learning_rates(optimizer: torch.optim.Optimizer, scheduler, base_lrs: Sequence[float]) -> None:
    """After a checkpoint's optimizer and scheduler states are loaded: continue the schedule
    from `base_lrs` (the resuming recipe's rates) at the checkpoint's step, instead of the
    rates the checkpoint's run started with."""
    scheduler.base_lrs = list(base_lrs)
    for group, base, factor in zip(optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


class StudentStep(nn.Module):
    """The student's forward and the objective as one module, so that DistributedDataParallel
    wraps the student and the projections together (one gradient reduction per step)."""

    def __init__(self, student: nn.Module, objective: Objective, capture: FeatureCapture):
        super().__init__()
        self.student = student
        self.objective = objective
        self._capture = capture

    def forward(self, batch: dict[str, Tensor], feats_T: list[Features], step_fraction: float):
        feats_S = self._capture.run(batch)
        return self.objective(step_fraction, feats_S, feats_T, batch.get("labels"))


class TeacherLogitCache:
    """Teacher logits per training row (CPU, float32), keyed by the row's index.

    Sequence classification stores (n_teachers, C) per row; token classification
    (n_teachers, length, C) for the row's real tokens, re-padded per batch (padded positions
    carry label -100 and are never read)."""

    def __init__(self) -> None:
        self._rows: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, indices: Sequence[int], batch: dict[str, Tensor], device) -> list[Features] | None:
        if any(i not in self._rows for i in indices):
            return None
        rows = [self._rows[i] for i in indices]
        if rows[0].dim() == 2:  # (n_teachers, C)
            logits = torch.stack(rows, dim=1)  # (n_teachers, B, C)
        else:
            width = batch["input_ids"].size(1)
            logits = torch.zeros(rows[0].size(0), len(rows), width, rows[0].size(-1))
            for b, row in enumerate(rows):
                logits[:, b, : row.size(1)] = row
        logits = logits.to(device, non_blocking=True)
        return [Features(logits=logits[t], mask=batch["attention_mask"]) for t in range(logits.size(0))]

    def store(self, indices: Sequence[int], feats_T: list[Features], batch: dict[str, Tensor]) -> None:
        stacked = torch.stack([f.logits.detach().float() for f in feats_T]).cpu()
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for b, i in enumerate(indices):
            row = stacked[:, b]
            self._rows[i] = (row if row.dim() == 2 else row[:, : int(lengths[b])]).clone()


class StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM set a flag that the loop checks after each step; a second
    signal stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def evaluate(
    logits_of: Callable[[dict[str, Tensor]], Tensor],
    dataset,
    collator: kdata.Collator,
    batch_size: int,
    device: torch.device,
    precision: str,
    outside_id: int | None,
) -> dict[str, float]:
    """Accuracy (and micro F1 over non-O tags for token classification) of `logits_of`."""
    predictions: list[int] = []
    gold: list[int] = []
    with torch.inference_mode(), autocast(device, precision):
        for indices in kdata.eval_batches(len(dataset), batch_size):
            batch = {k: v.to(device) for k, v in collator.batch(dataset, indices).items()}
            logits = logits_of(batch)
            predictions += logits.argmax(dim=-1).reshape(-1).tolist()
            gold += batch["labels"].reshape(-1).tolist()
    return report.classification_metrics(predictions, gold, outside_id=outside_id)


def _logits_fn(models: Sequence[nn.Module]) -> Callable[[dict[str, Tensor]], Tensor]:
    """Logits of one model, or the mean of several (multi-teacher), in eval mode."""

    def logits_of(batch: dict[str, Tensor]) -> Tensor:
        outs = []
        for m in models:
            was_training = m.training
            m.eval()
            outs.append(m(**model_inputs(m, batch)).logits.float())
            m.train(was_training)
        return outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)

    return logits_of


def _all_finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run(
    recipe,
    *,
    mode: Mode = "distill",
    output_dir: str | Path | None = None,
    max_steps: int | None = None,
    device: str | None = None,
    seed: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict:
    """Distil (or, with mode="train", fine-tune) the recipe's student; returns the summary.

    Overrides: `output_dir`, `max_steps` (optimizer steps; wins over num_epochs/num_steps),
    `device`, `seed`. `resume` continues from the latest checkpoint in the output folder;
    `overwrite` replaces a previous run's folder (only one kdcli wrote, and only once the
    models and data have loaded; else a non-empty folder is refused). Raises
    `UsageError`, `RunError` (e.g. `NonFiniteLossError`) or `Interrupted` (Ctrl-C, after a
    resumable checkpoint was written).
    """
    if mode not in ("distill", "train"):
        raise ValueError(f"mode must be 'distill' or 'train', not {mode!r}")
    if mode == "distill" and (recipe.distillation is None or not recipe.teachers):
        raise UsageError("`kdcli distill` needs a recipe with `teacher` and `distillation`. Fix: use `kdcli train` for fine-tuning")
    if max_steps is not None and max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, got {max_steps}")
    procs = Processes.from_env()
    started = False
    if procs.distributed and not torch.distributed.is_initialized():
        on_gpu = (device or recipe.training.device).startswith(("cuda", "auto")) and torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(procs.local_rank)  # before NCCL initialises
        torch.distributed.init_process_group(backend="nccl" if on_gpu else "gloo")
        started = True
    try:
        return _run(recipe, mode, procs, output_dir, max_steps, device, seed, resume, overwrite, quiet)
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _run(recipe, mode: Mode, procs: Processes, output_dir, max_steps, device_name, seed, resume, overwrite, quiet) -> dict:
    wall_start = time.perf_counter()
    training = recipe.training
    main = procs.is_main

    # --- output folder: checked, created, probed and locked before anything loads; the
    # previous run is cleared (--overwrite) only just before the first write (folder.begin) ---
    out = Path(os.path.abspath(output_dir or training.output_dir))

    def open_folder() -> outdir.RunFolder:
        return outdir.RunFolder.open(
            out, resume=resume, overwrite=overwrite, protected=read_paths(recipe), main=main, file_names=RUN_FILES,
        )

    folder = open_folder() if main else None
    procs.barrier()
    if not main:
        folder = open_folder()
    try:
        return _run_in(folder, recipe, mode, procs, max_steps, device_name, seed, quiet, wall_start)
    except OSError as exc:  # a full disk anywhere else (metrics.jsonl, TensorBoard): one message too
        if not ckpt.is_no_space(exc):
            raise
        raise RunError(
            f"no space left on the disk of {out} ({_first_line(exc)}). Fix: free space there, then "
            f"continue from the last checkpoint in {out / ckpt.CHECKPOINTS} with --resume"
        ) from None
    finally:
        folder.close()


def _run_in(folder: outdir.RunFolder, recipe, mode: Mode, procs: Processes, max_steps, device_name, seed, quiet, wall_start) -> dict:
    training = recipe.training
    main = procs.is_main
    out = folder.path
    resume_from = folder.latest

    warnings: list[str] = []
    progress: report.Progress | None = None

    def say(text: str, *, even_if_quiet: bool = False) -> None:
        """A line on stderr (rank 0, not quiet): above the progress bar once it runs."""
        if main and (even_if_quiet or not quiet):
            if progress is not None:
                progress.message(text)
            else:
                print(text, file=sys.stderr, flush=True)

    def warn(text: str) -> None:
        """A warning: on stderr even under --quiet (which silences progress and log lines,
        not what the user must know, such as code that trust_remote_code will run)."""
        warnings.append(text)
        say(text, even_if_quiet=True)

    if main and not folder.locked:
        warn(f"warning: cannot lock {out} (its file system has no file locks); make sure no other run writes there")

    # --- seed, device, precision ---------------------------------------------------------
    run_seed = training.seed if seed is None else seed
    seed_everything(run_seed)
    device = resolve_device(device_name or training.device, procs)
    precision = resolve_precision(training.precision, device)

    # --- tokenizer and data (rank 0 tokenises first; the others read datasets' cache) ------
    ref, revision, trust = tokenizer_ref(recipe)
    tokenizer = kmodels.load_tokenizer(ref, revision=revision, trust_remote_code=trust, warn=warn)
    if not main:
        procs.barrier()
    task_data = _quietly(kdata.prepare_from_recipe, recipe, tokenizer)
    if main:
        procs.barrier()
    collator = kdata.Collator.for_tokenizer(tokenizer)
    labels = task_data.labels
    outside_id = labels.label2id.get("O") if recipe.task == "token-classification" else None
    train_set = task_data.train
    lengths = task_data.train_lengths

    # --- models and objective ------------------------------------------------------------
    teachers, student = load_models(recipe, mode, labels, warn)
    kmodels.check_vocabularies(  # every model reads the tokenizer's ids as its own tokens
        tokenizer, ref,
        [("teacher", t.model, m) for t, m in zip(recipe.teachers, teachers)]
        + [("student", getattr(recipe.student, "model", None), student)],
    )
    objective = Objective(
        recipe.distillation if mode == "distill" else None,
        hidden_S=kmodels.model_dims(student).hidden_size,
        hidden_T=kmodels.model_dims(teachers[0]).hidden_size if teachers else None,
    )
    teachers = [t.to(device) for t in teachers]
    student.to(device).train()
    objective.to(device)
    capture_S = FeatureCapture(student, objective.hidden_layers("S"), objective.attention_layers("S"), role="student")
    captures_T = [
        FeatureCapture(t, objective.hidden_layers("T") if i == 0 else (), objective.attention_layers("T") if i == 0 else (),
                       role=f"teacher {i + 1}" if len(teachers) > 1 else "teacher")
        for i, t in enumerate(teachers)
    ]
    cache = None
    if mode == "distill" and recipe.distillation.is_caching_logits:
        if objective.matches:
            warn(
                "warning: is_caching_logits is off for this run: the intermediate matches need the "
                "teacher's features on every step, so caching its logits would save nothing"
            )
        else:
            cache = TeacherLogitCache()
    step_module: nn.Module = StudentStep(student, objective, capture_S)
    if procs.distributed:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
        )
    # different dropout masks per rank, the same model everywhere (DDP broadcast rank 0's)
    torch.manual_seed(run_seed + procs.rank)

    # --- schedule: steps, optimizer, learning rate ---------------------------------------
    bs, accum = training.batch_size, training.gradient_accumulation_steps
    batches_per_epoch = len(kdata.train_batches(lengths, bs, run_seed, 0, False, procs.rank, procs.world_size))
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = max_steps or training.num_steps or training.num_epochs * steps_per_epoch
    warmup_steps = math.ceil(training.warmup_ratio * total_steps)
    trainable = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = make_optimizer(param_groups(student, objective, training.weight_decay), training)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(total_steps, warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    position = ckpt.Position(step=0, epoch=0, batch_in_epoch=0, samples_seen=0)

    # --- resume --------------------------------------------------------------------------
    if resume_from is not None:
        recipe_lrs = list(scheduler.base_lrs)  # this recipe's rates, before the checkpoint's
        try:
            state = ckpt.load_checkpoint(resume_from, map_location=device)
        except Exception as exc:  # unpickling refused (weights_only), truncated file, ...
            raise RunError(
                f"cannot read the checkpoint {resume_from} ({type(exc).__name__}: {_first_line(exc)}). "
                "Fix: delete that folder to resume from the one before, or start again with --overwrite"
            ) from None
        try:
            student.load_state_dict(state.student)
            objective.load_state_dict(state.objective)
            optimizer.load_state_dict(state.optimizer)
            scheduler.load_state_dict(state.scheduler)
            if state.scaler:
                scaler.load_state_dict(state.scaler)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise UsageError(
                f"the checkpoint {resume_from} does not fit this recipe's models or matches "
                f"({_first_line(exc)}). Fix: resume with the recipe that started the run, or pass "
                "--overwrite to start again"
            ) from None
        if list(scheduler.base_lrs) != recipe_lrs:
            warn(
                f"warning: resuming with learning_rate {recipe_lrs[0]:g} (the checkpoint's run used "
                f"{scheduler.base_lrs[0]:g}): the schedule continues from step {state.position.step} at the new rate"
            )
            follow_learning_rates(optimizer, scheduler, recipe_lrs)
        ranks = state.rng.get("ranks", [state.rng])
        if len(ranks) == procs.world_size:
            ckpt.restore_rng(_to_cpu(ranks[procs.rank]))
        else:
            warn(f"warning: the checkpoint was written by {len(ranks)} process(es), this run has {procs.world_size}; the data order is kept, dropout draws differ")
        position = state.position
        say(f"resuming from {resume_from} (step {position.step} of {total_steps})")

    def save(pos: ckpt.Position) -> Path | None:
        """A checkpoint at a step boundary (every rank joins: RNG states are gathered)."""
        if not (_all_finite(student) and _all_finite(objective)):
            raise NonFiniteLossError(
                f"the student's weights became non-finite by step {pos.step}; no checkpoint was "
                f"written (the last good one stays in {out / ckpt.CHECKPOINTS}). Fix: lower "
                "training.learning_rate or use fp32/bf16"
            )
        rng = ckpt.capture_rng()
        if procs.distributed:
            gathered: list = [None] * procs.world_size
            torch.distributed.all_gather_object(gathered, _to_cpu(rng))
            rng_all = gathered
        else:
            rng_all = [rng]
        path = None
        if main:
            with disk_full_keeps(last_saved):
                path = ckpt.save_checkpoint(out, ckpt.Checkpoint(
                    position=pos, student=student.state_dict(), objective=objective.state_dict(),
                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    scaler=scaler.state_dict() if scaler.is_enabled() else None, rng={"ranks": rng_all},
                ))
        procs.barrier()
        return path

    @contextmanager
    def disk_full_keeps(kept_checkpoint: Path | None):
        """A full disk: one message naming the space needed, what is kept and how to go on."""
        try:
            yield
        except ckpt.DiskFullError as exc:
            need = ckpt.format_bytes(exc.needed)
            if kept_checkpoint is not None:
                raise RunError(
                    f"{exc}; the last good checkpoint {kept_checkpoint} is kept. Fix: make at least "
                    f"{need} free on that disk, then continue with `{command}`"
                ) from None
            raise RunError(
                f"{exc}; no checkpoint had been written yet. Fix: make at least {need} free on that "
                "disk, or choose an --output-dir on another one, and start again with --overwrite"
            ) from None

    def teacher_features(indices: list[int], batch: dict[str, Tensor]) -> list[Features]:
        if cache is not None:
            found = cache.lookup(indices, batch, device)
            if found is not None:
                return found
        feats = [c.run_teacher(batch) for c in captures_T]
        if cache is not None:
            cache.store(indices, feats, batch)
        return feats

    # --- evaluation of the teachers, once ------------------------------------------------
    eval_set = task_data.eval
    teacher_eval = None
    if main and eval_set is not None and teachers:
        teacher_eval = evaluate(_logits_fn(teachers), eval_set, collator, training.eval_batch_size, device, precision, outside_id)
        say("teacher eval: " + _metrics_line(teacher_eval))

    # --- outputs (rank 0): the first write; only now is a replaced run cleared -----------
    metrics = tb = None
    if main:
        folder.begin({"recipe_sha256": recipe_sha256(recipe), "mode": mode})
        metrics = report.MetricsLog(out / "metrics.jsonl", resume_step=position.step if resume_from else None)
        tb = report.TensorBoard(out / "tensorboard")
        if recipe.source is not None:
            ckpt.atomic_write_text(out / "recipe.json", Path(recipe.source).read_text(encoding="utf-8"))
        else:
            ckpt.atomic_write_text(out / "recipe.json", recipe.model_dump_json(indent=2, by_alias=True))

    # --- the loop ------------------------------------------------------------------------
    progress = report.Progress(
        report.progress_mode(quiet or not main), total_steps, initial_step=position.step, description=mode,
    )
    step, epoch, batch_in_epoch, samples_seen = position.step, position.epoch, position.batch_in_epoch, position.samples_seen
    start_step = step
    throughput = report.Throughput(step)
    train_start = time.perf_counter()
    samples_this_session = 0
    last_log: dict | None = None
    last_eval: dict | None = None
    last_saved: Path | None = resume_from
    epoch_batches: dict[int, list[list[int]]] = {}
    log_terms: dict[str, Tensor] = {}
    group = recipe.data.group_by_length
    command = resume_command(mode, recipe, out, procs, max_steps=max_steps, device=device_name, seed=seed)

    def batches_of(e: int) -> list[list[int]]:
        if e not in epoch_batches:
            epoch_batches.clear()
            epoch_batches[e] = kdata.train_batches(lengths, bs, run_seed, e, group, procs.rank, procs.world_size)
        return epoch_batches[e]

    try:
        with StopRequest() as stop:
            while step < total_steps:
                if batch_in_epoch >= len(batches_of(epoch)):
                    epoch, batch_in_epoch = epoch + 1, 0
                chunk = batches_of(epoch)[batch_in_epoch:batch_in_epoch + accum]
                fraction = step / total_steps
                step_terms: dict[str, Tensor] = {}
                bad: tuple[str, float, int] | None = None
                for micro, indices in enumerate(chunk):
                    batch = {k: v.to(device, non_blocking=True) for k, v in collator.batch(train_set, indices).items()}
                    last_micro = micro == len(chunk) - 1
                    sync = nullcontext() if (last_micro or not procs.distributed) else step_module.no_sync()
                    with sync:
                        with autocast(device, precision):
                            feats_T = teacher_features(indices, batch) if teachers else []
                            total, terms = step_module(batch, feats_T, fraction)
                        scaler.scale(total / len(chunk)).backward()
                    if bad is None and not bool(torch.isfinite(total.detach())):
                        name, value = _first_non_finite(total, terms)
                        bad = (name, value, batch_in_epoch + micro)
                    for name, value in (("loss", total), *terms.items()):
                        step_terms[name] = step_terms.get(name, 0.0) + value.detach().float() / len(chunk)
                    samples_this_session += len(indices) * procs.world_size
                    throughput.add(len(indices) * procs.world_size)

                # -- stop conditions, agreed by every rank --------------------------------
                flags = torch.tensor([float(bad is not None), float(stop.requested)], device=device)
                if procs.distributed:
                    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
                if flags[0] > 0:
                    where = (
                        f"term {bad[0]} = {bad[1]} at step {step + 1}, batch {bad[2] + 1} of epoch {epoch + 1}"
                        if bad is not None else f"on another process at step {step + 1}"
                    )
                    kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint had been written yet"
                    raise NonFiniteLossError(
                        f"the loss became non-finite ({where}); the run stopped and {kept}. Fix: lower "
                        "training.learning_rate, raise max_grad_norm clipping, use fp32/bf16, or check the data"
                        + (f"; then continue with `{command}`" if last_saved else "")
                    )

                # -- optimizer step ------------------------------------------------------
                if training.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable, training.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                batch_in_epoch += len(chunk)
                samples_seen += sum(len(i) for i in chunk) * procs.world_size
                if batch_in_epoch >= len(batches_of(epoch)):
                    epoch, batch_in_epoch = epoch + 1, 0
                position = ckpt.Position(step, epoch, batch_in_epoch, samples_seen)
                progress.advance(step)
                log_terms = step_terms

                # -- log ------------------------------------------------------------------
                if step % training.log_every == 0 or step == total_steps:
                    names = list(log_terms)
                    values = torch.stack([log_terms[n] for n in names])
                    if procs.distributed:
                        torch.distributed.all_reduce(values)
                        values /= procs.world_size
                    numbers = dict(zip(names, values.tolist()))
                    rate, eta = throughput.read(step, total_steps)
                    info = report.StepInfo(
                        step=step, total_steps=total_steps, epoch=samples_seen / max(1, len(train_set)),
                        loss=numbers.pop("loss"), terms=numbers, lr=scheduler.get_last_lr()[0],
                        samples_per_s=rate, eta_s=eta, weights=objective.weights(step / total_steps),
                    )
                    if main:
                        progress.show(info)
                        record = info.record()
                        metrics.write(record)
                        tb.add(step, record)
                    last_log = info.record()

                # -- evaluate -------------------------------------------------------------
                if eval_set is not None and training.eval_every and step % training.eval_every == 0 and step < total_steps:
                    last_eval = _evaluate_student(student, eval_set, collator, training, device, precision, outside_id, main)
                    if main:
                        _log_eval(step, last_eval, metrics, tb, say)
                    procs.barrier()

                # -- checkpoint -----------------------------------------------------------
                if flags[1] > 0 or (stop.requested and not procs.distributed):
                    last_saved = save(position)
                    raise Interrupted(
                        f"interrupted at step {step} of {total_steps}; a checkpoint was written to "
                        f"{last_saved or out / ckpt.CHECKPOINTS}. Resume with: {command}"
                    )
                if training.save_every and step % training.save_every == 0 and step < total_steps:
                    last_saved = save(position)
    except BaseException:
        _close(progress, metrics, tb, capture_S, *captures_T)
        raise
    progress.close()

    # --- finish --------------------------------------------------------------------------
    try:
        train_time = time.perf_counter() - train_start
        if eval_set is not None:
            last_eval = _evaluate_student(student, eval_set, collator, training, device, precision, outside_id, main)
            if main:
                _log_eval(step, last_eval, metrics, tb, say)
        last_saved = save(position)
        if main:
            with disk_full_keeps(last_saved):
                with ckpt.disk_full_as_error("the student model", out, ckpt.nbytes(student.state_dict())):
                    ckpt.atomic_save_pretrained_files(student, tokenizer, out)
                if len(objective.projections):
                    with ckpt.disk_full_as_error(PROJECTIONS_FILE, out, ckpt.nbytes(objective.state_dict())):
                        ckpt.atomic_save_safetensors(objective.state_dict(), out / PROJECTIONS_FILE)
    finally:
        _close(None, metrics, tb, capture_S, *captures_T)
    summary = {
        "mode": mode,
        "recipe": str(recipe.source) if recipe.source else None,
        "output_dir": str(out),
        "task": recipe.task,
        "device": str(device),
        "precision": precision,
        "processes": procs.world_size,
        "steps": step,
        "total_steps": total_steps,
        "epochs": round(samples_seen / max(1, len(train_set)), 4),
        "train_examples": len(train_set),
        "resumed_from_step": start_step if resume_from is not None else None,
        "final_loss": last_log["loss"] if last_log else None,
        "final_terms": {k[len("loss/"):]: v for k, v in (last_log or {}).items() if k.startswith("loss/")},
        "eval": last_eval,
        "teacher_eval": teacher_eval,
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "train_time_s": round(train_time, 3),
        "wall_time_s": round(time.perf_counter() - wall_start, 3),
        "samples_per_s": round(samples_this_session / train_time, 3) if train_time > 0 and step > start_step else None,
        "peak_memory_mb": round(report.peak_memory_mb(device.type), 1),
        "checkpoint": str(last_saved) if last_saved else None,
        "teacher_cache_rows": len(cache) if cache is not None else None,
        "warnings": warnings,
    }
    if main:
        with disk_full_keeps(last_saved), ckpt.disk_full_as_error("summary.json", out, 1 << 16):
            ckpt.atomic_write_json(out / "summary.json", summary)
            summary["files"] = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
            ckpt.atomic_write_json(out / "summary.json", summary)
    return summary


# ---------------------------------------------------------------------------------------------
# Small helpers of the loop
# ---------------------------------------------------------------------------------------------


def _quietly(fn, *args):
    """Call `fn` with datasets' own progress bars off (kdcli shows its own progress)."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return fn(*args)
    finally:
        if bars:
            datasets.enable_progress_bars()


def _close(progress, metrics, tb, *captures) -> None:
    for thing in (progress, metrics, tb, *captures):
        if thing is not None:
            thing.close()


def _to_cpu(state):
    """RNG states with every tensor on the CPU (for gathering and for torch.set_rng_state)."""
    if isinstance(state, Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_cpu(v) for v in state)
    return state


def _first_non_finite(total: Tensor, terms: dict[str, Tensor]) -> tuple[str, float]:
    """The first term (in objective order) that is NaN or infinite; "total" if none is."""
    for name, value in terms.items():
        if not bool(torch.isfinite(value.detach()).all()):
            return name, float(value.detach().float())
    return "total", float(total.detach().float())


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _metrics_line(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def _evaluate_student(student, eval_set, collator, training, device, precision, outside_id, main) -> dict | None:
    """The student's eval metrics on rank 0 (None on the other ranks); train mode restored."""
    if not main:
        return None
    was_training = student.training
    student.eval()
    try:
        return evaluate(_logits_fn([student]), eval_set, collator, training.eval_batch_size, device, precision, outside_id)
    finally:
        student.train(was_training)


def _log_eval(step: int, metrics: dict, log: report.MetricsLog | None, tb: report.TensorBoard | None, say) -> None:
    record = {"step": step, **{f"eval/{k}": v for k, v in metrics.items()}}
    if log is not None:
        log.write(record)
    if tb is not None:
        tb.add(step, record)
    say(f"step {step} eval: " + _metrics_line(metrics))
