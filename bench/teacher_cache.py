"""The teacher cache's speed: the SST-2 demo's 2-epoch distillation without and with
`distillation.teacher_cache`, and the reference (TextBrewer 0.2.1, dynamic padding) on the same work.

    python bench/teacher_cache.py                 # the three sides (about 20 min on 2 quiet cores)
    python bench/teacher_cache.py --rows 2048     # a quicker look on the first 2,048 rows
    python bench/teacher_cache.py --sides kdcli kdcli-cache
    python bench/teacher_cache.py --read          # cache reads alone, synthetic rows (no teacher needed)

The work: recipes/sst2-distill.json as the demo runs it (teacher runs/sst2-teacher, the
fine-tuned MiniLM from `make demo`; student of 3 blocks from teacher blocks 2, 4, 6; KD ce at
T = 2 + hard labels + hidden_mse on (0,0), (2,1), (4,2), (6,3); batch 32, max length 64, lr 2e-4
with 10% warm-up then linear decay, AdamW with weight decay 0.01, clipping at 1.0, seed 42),
2 epochs of the 10,000 training rows, without the eval split (speed only).

Sides, each in its own subprocess, one after the other:
* `kdcli`: the recipe as it is;
* `kdcli-cache`: the same with `"teacher_cache": {}` (fp16, a fresh cache folder, so epoch 1
  runs the teacher and fills the cache, epoch 2 reads it);
* `reference`: TextBrewer 0.2.1's GeneralDistiller on the same objective, schedule and student
  initialisation, its batches padded to their longest row (dynamic padding), the adaptor
  returning logits, hidden states (output_hidden_states=True), the mask and the model's loss.

samples/s: 2 epochs of rows over the time from the first optimizer step's end to the last
one's (a global optimizer-step hook, as bench/distill.py), so model loading, tokenising and
saving are outside; samples per CPU-second: the same steps over the process's CPU time (all
threads), which other jobs on a shared machine change far less than the wall time. The loss effect of fp16 storage: max |loss_cache - loss_no_cache| over
the logged steps (every 10th; same seed, same dropout draws: the teacher runs in eval mode and
draws nothing, so the two runs differ only by the cached values from epoch 2 on).
Results go to runs/bench/teacher_cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
RECIPE = ROOT / "recipes" / "sst2-distill.json"
TEACHER = ROOT / "runs" / "sst2-teacher"
OUT = ROOT / "runs" / "bench" / "teacher-cache"
SIDES = ("kdcli", "kdcli-cache", "reference")


def clock():
    """bench/distill.py's StepClock, also stamping this process's CPU time (all threads) at each
    step: samples per CPU-second barely move when other jobs share the machine."""
    from distill import StepClock

    class CpuClock(StepClock):
        def __enter__(self):
            from torch.optim.optimizer import register_optimizer_step_post_hook

            self.cpu: list[float] = []

            def stamp(*_):
                self.stamps.append(time.perf_counter())
                self.cpu.append(time.process_time())

            self._handle = register_optimizer_step_post_hook(stamp)
            return self

        def rates(self, batch: int) -> dict:
            samples = (len(self.stamps) - 1) * batch
            half = len(self.stamps) // 2  # the last step of epoch 1 (2 epochs of equal steps)
            return {
                "steps": len(self.stamps),
                "samples_per_s": samples / (self.stamps[-1] - self.stamps[0]),
                "samples_per_cpu_s": samples / (self.cpu[-1] - self.cpu[0]),
                "epoch1_samples_per_s": (half - 1) * batch / (self.stamps[half - 1] - self.stamps[0]),
                "epoch2_samples_per_s": (len(self.stamps) - half) * batch / (self.stamps[-1] - self.stamps[half - 1]),
            }

    return CpuClock()


def recipe_doc(rows_file: Path, output_dir: Path, cache: Path | None) -> dict:
    doc = json.loads(RECIPE.read_text(encoding="utf-8"))
    doc.pop("$schema", None)
    doc["teacher"] = {"model": str(TEACHER)}
    doc["student"]["config"] = str(TEACHER)
    doc["data"]["train"] = {"path": str(rows_file), "format": "tsv"}
    doc["data"].pop("eval", None)
    doc["training"].update(num_epochs=2, output_dir=str(output_dir), log_every=10, device="cpu", precision="fp32")
    if cache is not None:
        doc["distillation"]["teacher_cache"] = {"dir": str(cache)}
    return doc


def run_kdcli(rows_file: Path, cached: bool) -> dict:
    from kdcli import distill
    from kdcli.recipe import load_recipe

    name = "cached" if cached else "plain"
    out = OUT / name
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.json"
        cache = Path(tmp) / "cache" if cached else None
        path.write_text(json.dumps(recipe_doc(rows_file, out, cache)))
        start = time.perf_counter()
        with clock() as steps:
            summary = distill.run(load_recipe(path, mode="distill"), overwrite=True, quiet=True)
        wall = time.perf_counter() - start
        size = sum(p.stat().st_size for p in cache.rglob("rank*.data")) if cache else 0
    losses = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        **steps.rates(32),
        "wall_s": wall,
        "losses": {r["step"]: r["loss"] for r in losses if "loss" in r},
        "cache_rows": summary["teacher_cache_rows"],
        "cache_bytes": size,
        "final_loss": summary["final_loss"],
    }


def run_reference(rows_file: Path) -> dict:
    """TextBrewer 0.2.1 on the same objective, batches padded to their longest row."""
    import torch
    from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    from distill import read_sst2

    doc = recipe_doc(rows_file, OUT / "reference", None)
    training, distillation = doc["training"], doc["distillation"]
    torch.manual_seed(training.get("seed", 42))
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    teacher = AutoModelForSequenceClassification.from_pretrained(TEACHER)
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = 3
    student = AutoModelForSequenceClassification.from_config(config)
    state = {}
    for key, value in teacher.state_dict().items():
        if ".encoder.layer." in key:
            prefix, rest = key.split(".encoder.layer.", 1)
            block, tail = rest.split(".", 1)
            if int(block) + 1 in (2, 4, 6):
                state[f"{prefix}.encoder.layer.{(int(block) + 1) // 2 - 1}.{tail}"] = value
        else:
            state[key] = value
    student.load_state_dict(state, strict=True)
    rows = read_sst2(rows_file)
    encoded = tokenizer([s for _, s in rows], truncation=True, max_length=doc["data"]["max_length"])
    items = list(zip(encoded["input_ids"], encoded["token_type_ids"], [int(label) for label, _ in rows]))

    def collate(batch):
        width = max(len(ids) for ids, _, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
        for i, (seq, typ, _) in enumerate(batch):
            ids[i, : len(seq)], types[i, : len(typ)], mask[i, : len(seq)] = torch.tensor(seq), torch.tensor(typ), 1
        labels = torch.tensor([label for _, _, label in batch])
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}

    batch_size, epochs = training["batch_size"], training["num_epochs"]
    loader = torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=True, collate_fn=collate)

    def adaptor(batch, outputs):
        return {
            "logits": outputs.logits,
            "hidden": outputs.hidden_states,
            "inputs_mask": batch["attention_mask"],
            "losses": outputs.loss,  # the hard-label term (the model's cross-entropy on the labels)
        }

    matches = [
        {"layer_T": m["layer_T"], "layer_S": m["layer_S"], "feature": "hidden", "loss": "hidden_mse", "weight": 1}
        for m in distillation["intermediate_matches"]
    ]
    total = epochs * len(loader)
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {
            "params": [p for n, p in student.named_parameters() if not any(x in n for x in no_decay)],
            "weight_decay": 0.01,
        },
        {"params": [p for n, p in student.named_parameters() if any(x in n for x in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=training["learning_rate"])
    import logging

    logging.getLogger("Distillation").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as out:
        distiller = GeneralDistiller(
            train_config=TrainingConfig(device="cpu", output_dir=out, log_dir=None),
            distill_config=DistillationConfig(
                temperature=distillation["temperature"],
                kd_loss_type="ce",
                kd_loss_weight=1,
                hard_label_weight=1,
                intermediate_matches=matches,
            ),
            model_T=teacher,
            model_S=student,
            adaptor_T=adaptor,
            adaptor_S=adaptor,
        )
        start = time.perf_counter()
        with clock() as steps:
            distiller.train(
                optimizer,
                loader,
                num_epochs=epochs,
                scheduler_class=get_linear_schedule_with_warmup,
                scheduler_args={"num_warmup_steps": int(0.1 * total), "num_training_steps": total},
                max_grad_norm=1.0,
                output_hidden_states=True,
            )
        wall = time.perf_counter() - start
    return {**steps.rates(batch_size), "wall_s": wall}


def time_parts(rows_file: Path, batches: int = 24) -> dict:
    """Per batch of the demo's work, in one process and interleaved: the teacher's forward
    (hidden layers 0, 2, 4, 6 and logits captured) against reading the same batch from a
    filled fp16 cache, and one full kdcli train step, in milliseconds (median of `batches`)."""
    import statistics

    import torch

    from kdcli import data as kdata
    from kdcli import models as kmodels
    from kdcli.engine.teacher_cache import TeacherDiskCache
    from kdcli.features import FeatureCapture
    from kdcli.recipe import load_recipe

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.json"
        path.write_text(json.dumps(recipe_doc(rows_file, Path(tmp) / "out", None)))
        recipe = load_recipe(path, mode="distill")
        tokenizer = kmodels.load_tokenizer(str(TEACHER))
        task_data = kdata.prepare_from_recipe(recipe, tokenizer)
        teacher = kmodels.load_model(str(TEACHER), recipe.task, role="teacher").model.eval()
        capture = FeatureCapture(teacher, [0, 2, 4, 6], role="teacher")
        cache = TeacherDiskCache(Path(tmp) / "cache", 0, key="0" * 64, dtype="fp16")
        collator = kdata.Collator.for_tokenizer(tokenizer)
        order = kdata.train_batches(task_data.train_lengths, 32, 42, 0, True)[:batches]
        forward, read = [], []
        for indices in order:
            batch = collator.batch(task_data.train, indices)
            start = time.perf_counter()
            feats = [capture.run_teacher(batch)]
            forward.append(time.perf_counter() - start)
            cache.store(indices, feats, batch)
            start = time.perf_counter()
            assert cache.lookup(indices, batch, "cpu") is not None
            read.append(time.perf_counter() - start)
        cache.close()
    return {
        "batches": len(order),
        "teacher_forward_ms": 1000 * statistics.median(forward),
        "cache_read_ms": 1000 * statistics.median(read),
    }


def time_reads(batches: int = 24, repeats: int = 7) -> dict:
    """A batch read from a filled fp16 cache (`TeacherDiskCache.lookup`: checks and decoding)
    and, interleaved with it, the checks alone (`_checked_rows`: each row's CRC-32, counts,
    size), in milliseconds (median over `batches` x `repeats` reads, after one warm read each),
    on synthetic rows of the demo's shape: batch 32, 5 to 21 real tokens a row (13 on average),
    2 logits and 4 hidden layers of 384 per token."""
    import statistics

    import torch

    from kdcli.engine.teacher_cache import TeacherDiskCache
    from kdcli.features import Features

    g = torch.Generator().manual_seed(0)
    times, checks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cache = TeacherDiskCache(Path(tmp), 0, key="0" * 64, dtype="fp16", sync=False)
        work = []
        for n in range(batches):
            lengths = torch.randint(5, 22, (32,), generator=g)
            mask = (torch.arange(int(lengths.max())) < lengths[:, None]).long()
            batch = {"input_ids": torch.ones_like(mask), "attention_mask": mask}
            hidden = {i: torch.randn(32, mask.size(1), 384, generator=g) for i in (0, 2, 4, 6)}
            indices = list(range(32 * n, 32 * (n + 1)))
            cache.store(indices, [Features(logits=torch.randn(32, 2, generator=g), hidden=hidden, mask=mask)], batch)
            work.append((indices, batch))
        for indices, batch in work:
            assert cache.lookup(indices, batch, "cpu") is not None
            for _ in range(repeats):
                start = time.perf_counter()
                cache.lookup(indices, batch, "cpu")
                times.append(time.perf_counter() - start)
                start = time.perf_counter()
                cache._checked_rows(indices, batch)
                checks.append(time.perf_counter() - start)
        size = sum(p.stat().st_size for p in Path(tmp).glob("rank*.data"))
        cache.close()
    return {
        "batches": batches,
        "reads": len(times),
        "cache_read_ms": 1000 * statistics.median(times),
        "checks_ms": 1000 * statistics.median(checks),
        "bytes": size,
    }


def rows_file(rows: int | None) -> Path:
    source = ROOT / "recipes" / "data" / "sst2" / "train.tsv"
    if rows is None:
        return source
    OUT.mkdir(parents=True, exist_ok=True)
    target = OUT / f"train-{rows}.tsv"
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    target.write_text("".join(lines[: rows + 1]), encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None, help="Only the first N training rows (default: all 10,000).")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument(
        "--parts", action="store_true", help="Time the teacher's forward against a cache read, per batch."
    )
    parser.add_argument("--read", action="store_true", help="Time cache reads alone, on synthetic rows.")
    parser.add_argument("--keep", action="store_true", help="Keep the other sides' results of the last run.")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.read:
        print(json.dumps(time_reads()))
        return
    data = rows_file(args.rows)
    if args.parts:
        print(json.dumps(time_parts(data)))
        return
    if args.child:
        result = run_reference(data) if args.child == "reference" else run_kdcli(data, args.child == "kdcli-cache")
        sys.stdout.write(json.dumps(result) + "\n")
        return
    if not (TEACHER / "model.safetensors").exists():
        sys.exit(f"{TEACHER} holds no model: run `make demo` (or kdcli train recipes/sst2-teacher.json) first")
    load = os.getloadavg()
    saved = ROOT / "runs" / "bench" / "teacher_cache.json"
    results = json.loads(saved.read_text()) if args.keep and saved.exists() else {"sides": {}}
    results.update(date=time.strftime("%Y-%m-%d %H:%M"), rows=args.rows or 10000)
    for side in args.sides:
        cmd = [sys.executable, __file__, "--child", side] + (["--rows", str(args.rows)] if args.rows else [])
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        if proc.returncode:
            sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
        results["sides"][side] = {**json.loads(proc.stdout.splitlines()[-1]), "load_before": load}
        load = os.getloadavg()
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(results, indent=1))
        print(f"{side}: {results['sides'][side]['samples_per_s']:.1f} samples/s", flush=True)
    sides = results["sides"]
    if "reference" in sides:
        base, base_cpu = sides["reference"]["samples_per_s"], sides["reference"].get("samples_per_cpu_s")
        for side in sides.values():
            side["ratio_to_reference"] = side["samples_per_s"] / base
            if base_cpu and side.get("samples_per_cpu_s"):
                side["cpu_ratio_to_reference"] = side["samples_per_cpu_s"] / base_cpu
    if "kdcli" in sides and "kdcli-cache" in sides:
        plain, cached = sides["kdcli"]["losses"], sides["kdcli-cache"]["losses"]
        common = sorted(set(plain) & set(cached), key=int)
        results["max_abs_loss_diff_fp16"] = max(abs(plain[s] - cached[s]) for s in common)
        results["max_abs_loss_diff_epoch1"] = max(
            (abs(plain[s] - cached[s]) for s in common if int(s) <= sides["kdcli"]["steps"] // 2), default=None
        )
    OUT.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(results, indent=1))
    print("| side | samples/s | ratio to reference | samples per CPU-s | CPU ratio | wall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, side in sides.items():
        ratio, cpu, cpu_ratio = (
            side.get("ratio_to_reference"),
            side.get("samples_per_cpu_s"),
            side.get("cpu_ratio_to_reference"),
        )
        print(
            f"| {name} | {side['samples_per_s']:.1f} | {f'{ratio:.2f}x' if ratio else '-'} | "
            f"{f'{cpu:.1f}' if cpu else '-'} | {f'{cpu_ratio:.2f}x' if cpu_ratio else '-'} | {side['wall_s']:.0f} |"
        )
    for key in ("max_abs_loss_diff_fp16", "max_abs_loss_diff_epoch1"):
        if results.get(key) is not None:
            print(f"{key}: {results[key]:.3g}")
    for name, side in sides.items():
        print(f"{name}: load average (1, 5, 15 min) before it {side.get('load_before')}")


if __name__ == "__main__":
    main()
