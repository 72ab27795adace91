"""The causal-LM engine (task causal-lm) end to end, against plain full-logits computations.

Tiny seeded Llama / Qwen2 / GPT-2 teachers (hidden 32, 4 layers) and students (2 layers) from
tests/tiny.py, on a few rows of each row format. The references are computed the plain way:
the full logits `model(**inputs).logits`, the shift rule `next_token_labels`, the per-token
divergences of `kdcli.losses.divergences` and `F.cross_entropy`, usually in float64.

- e2e: distil, eval metrics in the summary, the output folder loads with plain transformers;
- the objective's chunked path = full logits (value and student gradients);
- reduction: one step's gradient (read from AdamW's first moment in the checkpoint) is the
  same for batch 8, batch 4 x accumulation 2 and two processes x batch 4, and is the mean
  over the step's target tokens (not a mean of per-micro-batch means);
- resume, multi-teacher (mean logits), dropped rows, eval metrics.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kdcli import data as kdata
from kdcli import distill, registry
from kdcli.engine.optim import param_groups
from kdcli.errors import Interrupted
from kdcli.features import HEAD, FeatureCapture
from kdcli.objective import Objective
from kdcli.recipe import DistillationConfig, load_recipe
from kdcli.run_files.checkpoint import load_checkpoint
from kdcli.tasks import IGNORE_INDEX, task_for
from kdcli.tasks.causal_lm import evaluate_lm
from kdcli.tasks.lm_rows import next_token_labels
from launch import torchrun_kdcli
from tiny import CHATML_TEMPLATE, LM_WORDS, interrupt_at, make_tiny_lm, tiny_lm_tokenizer, write_lm_rows

TEMPERATURE = 2.0
HARD = 0.5


# --- the world: tiny models and data files ---------------------------------------------------


def _write_varied_completions(path: Path, n: int) -> Path:
    """Prompt-completion rows whose completions have very different lengths (1 to ~30 words),
    so micro-batches of the same step hold very different numbers of target tokens."""
    import random

    rng = random.Random(7)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            prompt = " ".join(rng.choice(LM_WORDS) for _ in range(rng.randint(2, 6))).capitalize() + "?\n"
            words = 1 if i % 2 else rng.randint(15, 30)  # alternate: very short / long completions
            completion = " ".join(rng.choice(LM_WORDS) for _ in range(words)) + "."
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


def _sharpened(source: Path, folder: Path, factor: float) -> Path:
    """A copy of a tiny Llama whose final norm weight is multiplied by `factor`: its logits are
    `factor` times larger, so its next-token distributions are peaked (a random tiny model's are
    nearly uniform, where KL(p || q) and KL(q || p) hardly differ)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.model.norm.weight.mul_(factor)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal_lm_engine")
    for arch in ("llama", "qwen2", "gpt2"):
        make_tiny_lm(root / arch, arch, layers=4, hidden=32)
    make_tiny_lm(root / "llama-b", "llama", layers=4, hidden=32, seed=1)  # a second teacher
    make_tiny_lm(root / "student", "llama", layers=2, hidden=32, seed=5)  # a student of known weights
    _sharpened(root / "llama", root / "llama-sharp", 10.0)
    for fmt in ("text", "prompt-completion", "messages"):
        write_lm_rows(root / f"{fmt}-train.jsonl", fmt, 8, seed=1)
        write_lm_rows(root / f"{fmt}-eval.jsonl", fmt, 6, seed=2)
    write_lm_rows(root / "text-16.jsonl", "text", 16, seed=3)
    _write_varied_completions(root / "varied.jsonl", 16)
    return root


def write_recipe(folder: Path, name: str, **sections) -> Path:
    """A causal-lm recipe: llama teacher, 2-layer config student initialised from blocks 2 and 4,
    text rows; `sections` update (dicts) or replace the defaults (None removes a key)."""
    recipe = {
        "task": "causal-lm",
        "teacher": {"model": "llama"},
        "student": {"config": "llama", "overrides": {"num_hidden_layers": 2}, "init_from_teacher": [2, 4]},
        "data": {
            "train": "text-train.jsonl",
            "eval": "text-eval.jsonl",
            "row_format": "text",
            "text_column": "text",
            "max_length": 64,
            "group_by_length": False,
        },
        "training": {
            "num_steps": 4,
            "batch_size": 8,
            "eval_batch_size": 4,
            "learning_rate": 2e-3,
            "warmup_ratio": 0.0,
            "log_every": 1,
            "device": "cpu",
            "precision": "fp32",
        },
        "distillation": {
            "kd_loss_type": "forward_kl",
            "temperature": TEMPERATURE,
            "hard_label_weight": HARD,
            "chunk_size": 16,
        },
    }
    for key, value in sections.items():
        if value is None:
            recipe.pop(key, None)
        elif key in ("data", "training", "distillation") and isinstance(value, dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path = folder / f"{name}.json"
    path.write_text(json.dumps(recipe, indent=1))
    return path


def _run(path: Path, out: Path, **kwargs) -> dict:
    return distill.run(load_recipe(path, mode="distill"), output_dir=out, overwrite=True, quiet=True, **kwargs)


def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


# --- plain full-logits references ------------------------------------------------------------


def _lm(folder: Path, dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(dtype)


@pytest.fixture(scope="module")
def f64(world):
    """`f64(name)`: the model folder `world / name` in float64, loaded once per module; its
    gradients are cleared on every call (the weights are never changed)."""
    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = _lm(world / name)
        loaded[name].zero_grad(set_to_none=True)
        return loaded[name]

    return get


def _logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _options(kd: str, options: dict) -> dict:
    """The options a run passes to the divergence: the registry's defaults, then the recipe's."""
    return {**registry.get_loss(kd).option_defaults(), **options}


def _sums(student, teachers, batch, kd="forward_kl", options=None):
    """(sum of the per-token KD, sum of the next-token CE, target count) over a batch's targets,
    from full logits; the KD target is the teachers' mean logits."""
    logits_S = _logits(student, batch)
    with torch.no_grad():
        logits_T = sum(_logits(t, batch) for t in teachers) / len(teachers)
    targets = next_token_labels(batch["labels"])
    keep = targets != IGNORE_INDEX
    per_token = registry.get_loss(kd).token_fn()(
        logits_S[keep], logits_T[keep], temperature=TEMPERATURE, **_options(kd, options or {})
    )
    ce = F.cross_entropy(logits_S[keep], targets[keep], reduction="sum")
    return per_token.sum(), ce, int(keep.sum())


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _rows(world: Path, file: str, row_format: str, max_length: int = 64):
    """The encoded rows of a data file, as a run encodes them (the teachers' tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world / "llama")
    data = kdata.prepare_data(
        kdata.Source(str(world / file), "jsonl"),
        None,
        tokenizer,
        task="causal-lm",
        row_format=row_format,
        max_length=max_length,
        cache_dir=str(world / "hf-cache"),
    )
    return data, kdata.Collator.for_tokenizer(tokenizer)


def _first_moments(out: Path, step: int = 1) -> tuple[list[torch.Tensor], float]:
    """AdamW's exp_avg of every parameter (in optimizer order) after `step`, and beta1."""
    state = load_checkpoint(out / "checkpoints" / f"step-{step}").optimizer
    order = [i for group in state["param_groups"] for i in group["params"]]
    beta1 = state["param_groups"][0]["betas"][0]
    assert all(g["betas"][0] == beta1 for g in state["param_groups"])
    return [state["state"][i]["exp_avg"] for i in order], beta1


def _optimizer_order(model) -> list[str]:
    """The names of the student's parameters in the engine's optimizer order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in param_groups(model, Objective(None), 0.01) for p in g["params"]]


def _assert_close_lists(got, want, *, rtol, atol_scale, what=""):
    assert len(got) == len(want)
    scale = max(float(w.abs().max()) for w in want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(
            g.double(), w.double(), rtol=rtol, atol=atol_scale * scale, msg=lambda m, i=i: f"{what} tensor {i}: {m}"
        )


def _relative_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = math.sqrt(sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b)))
    den = math.sqrt(sum(float(y.double().pow(2).sum()) for y in b))
    return num / den


# --- 1. end to end ---------------------------------------------------------------------------

E2E = [
    ("llama", "messages", "forward_kl", {}),
    ("qwen2", "prompt-completion", "jsd", {"beta": 0.3}),
    ("gpt2", "text", "reverse_kl", {"top_k": 8}),
]


@pytest.mark.parametrize(("arch", "row_format", "kd", "options"), E2E, ids=[a for a, *_ in E2E])
def test_distil_end_to_end_and_the_output_loads_with_plain_transformers(world, arch, row_format, kd, options):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_recipe(
        world,
        f"e2e-{arch}",
        teacher={"model": arch},
        student={"config": arch, "overrides": {"num_hidden_layers": 2}, "init_from_teacher": [2, 4]},
        data={"train": f"{row_format}-train.jsonl", "eval": f"{row_format}-eval.jsonl", "row_format": row_format},
        distillation={
            "kd_loss_type": kd,
            "kd_loss_options": options,
            "intermediate_matches": [
                {"layer_T": 4, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1}
            ],
        },
    )
    out = world / f"out-e2e-{arch}"
    summary = _run(path, out)

    assert summary["task"] == "causal-lm" and summary["steps"] == 4
    losses = _losses(out)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    # batch 8 of 8 rows: every step sees the whole set, so the loss goes down
    assert losses[-1] < losses[0], losses
    assert set(summary["final_terms"]) >= {"kd", "hard_label", "hidden_mse[4->2]"}

    ev, teacher_ev = summary["eval"], summary["teacher_eval"]
    assert {"kl", "top1_agreement", "perplexity", "tokens"} <= set(ev)
    assert ev["tokens"] > 0 and isinstance(ev["tokens"], int)
    assert ev["kl"] >= 0 and 0 <= ev["top1_agreement"] <= 1 and 1 < ev["perplexity"] < 1e4
    assert math.isfinite(teacher_ev["perplexity"]) and teacher_ev["perplexity"] > 1
    assert teacher_ev["tokens"] == ev["tokens"]

    # the output folder is a plain transformers model folder
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    teacher_generation = json.loads((world / arch / "generation_config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == teacher_generation["eos_token_id"] == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == arch and model.config.num_hidden_layers == 2
    assert tokenizer.eos_token_id == 0 and len(tokenizer) == len(tiny_lm_tokenizer())
    if row_format == "messages":
        assert tokenizer.chat_template == CHATML_TEMPLATE
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hello, how are you?"}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    else:
        inputs = dict(tokenizer("Tell me about the moon", return_tensors="pt"))
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new = generated.shape[1] - inputs["input_ids"].shape[1]
    assert 1 <= new <= 5
    assert torch.equal(generated[0, : inputs["input_ids"].shape[1]], inputs["input_ids"][0])


# --- 2. the chunked objective = full logits ----------------------------------------------------

OBJECTIVE_CASES = [
    ("forward_kl", {}),
    ("jsd", {"beta": 0.3}),
    ("tvd", {}),
    ("ce", {}),
    ("forward_kl", {"top_k": 8}),
    ("reverse_kl", {"top_k": 8, "top_k_mode": "tail"}),
]


def _objective(kd: str, options: dict, chunk_size: int = 5) -> Objective:
    config = DistillationConfig.model_validate(
        {
            "kd_loss_type": kd,
            "kd_loss_options": options,
            "temperature": TEMPERATURE,
            "hard_label_weight": HARD,
            "chunk_size": chunk_size,
        }
    )
    return Objective(config, kd_term=task_for("causal-lm").kd_term(config))


@pytest.fixture(scope="module")
def pc_batch(world):
    """4 prompt-completion rows of different lengths, padded (a real collated batch)."""
    data, collator = _rows(world, "varied.jsonl", "prompt-completion")
    return collator.batch(data.train, [0, 1, 2, 3])


@pytest.mark.parametrize(
    ("kd", "options"), OBJECTIVE_CASES, ids=[f"{k}-{'-'.join(o) or 'full'}" for k, o in OBJECTIVE_CASES]
)
def test_chunked_objective_equals_full_logits_value_and_gradients(f64, pc_batch, kd, options):
    student, teacher = f64("student"), f64("llama")
    batch = pc_batch
    with FeatureCapture(student, readout=HEAD) as cap_S, FeatureCapture(teacher, readout=HEAD) as cap_T:
        feats_S = cap_S.run(batch)
        feats_T = cap_T.run_teacher(batch)
    assert feats_S.logits is None and feats_S.final_hidden.dtype == torch.float64
    objective = _objective(kd, options)
    total, terms = objective(0.0, feats_S, [feats_T], batch["labels"])
    total.backward()
    got = _grads(student)

    kd_sum, ce_sum, n = _sums(student, [teacher], batch, kd, options)
    assert n == int((next_token_labels(batch["labels"]) != IGNORE_INDEX).sum()) > 3 * objective.config.chunk_size
    want_total = kd_sum / n + HARD * ce_sum / n
    want_total.backward()
    want = _grads(student)

    torch.testing.assert_close(terms["kd"], (kd_sum / n).detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["hard_label"], (ce_sum / n).detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(total.detach(), want_total.detach(), rtol=1e-6, atol=0)
    assert got.keys() == want.keys() and len(got) == len(list(student.parameters()))
    scale = max(float(g.abs().max()) for g in want.values())
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], rtol=1e-6, atol=1e-9 * scale, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_micro_batches_with_the_step_normaliser_sum_to_the_step_mean(f64, pc_batch):
    """Two micro-batches, each divided by the step's target count, add up to the mean over
    the step's targets (value and gradient), which is not the mean of the two batch means."""
    student, teacher = f64("student"), f64("llama")
    halves = [{k: v[rows] for k, v in pc_batch.items()} for rows in (slice(0, 1), slice(1, 4))]
    counts = [int((next_token_labels(h["labels"]) != IGNORE_INDEX).sum()) for h in halves]
    assert counts[0] != counts[1]
    objective = _objective("forward_kl", {})
    with FeatureCapture(student, readout=HEAD) as cap_S, FeatureCapture(teacher, readout=HEAD) as cap_T:
        total = 0.0
        for h in halves:
            part, _ = objective(0.0, cap_S.run(h), [cap_T.run_teacher(h)], h["labels"], normaliser=float(sum(counts)))
            part.backward()
            total += float(part.detach())
    got = _grads(student)

    kd_sum, ce_sum, n = _sums(student, [teacher], pc_batch)
    assert n == sum(counts)
    want = (kd_sum + HARD * ce_sum) / n
    want.backward()
    want_grads = _grads(student)
    assert total == pytest.approx(float(want.detach()), rel=1e-9)
    for name in want_grads:
        torch.testing.assert_close(got[name], want_grads[name], rtol=1e-6, atol=1e-12)
    # the mean of the two batch means is another number, with another gradient
    means = [(k + HARD * c) / m for k, c, m in (_sums(student, [teacher], h) for h in halves)]
    per_batch = sum(means) / len(means)
    per_batch.backward()
    per_batch_grads = _grads(student)
    assert abs(float(per_batch.detach()) - float(want.detach())) > 1e-5 * float(want.detach())
    names = list(want_grads)
    gap = _relative_gap([per_batch_grads[n] for n in names], [want_grads[n] for n in names])
    assert gap > 1e-2


# --- 3. reduction invariance: one step's gradient ----------------------------------------------


def _reduction_recipe(world: Path, name: str, batch_size: int, accumulation: int, **extra) -> Path:
    return write_recipe(
        world,
        name,
        student={"model": "student"},
        data={"train": "varied.jsonl", "eval": None, "row_format": "prompt-completion"},
        training={
            "num_steps": 1,
            "batch_size": batch_size,
            "gradient_accumulation_steps": accumulation,
            "max_grad_norm": 0.0,
            "learning_rate": 1e-3,
            "seed": 11,
        },
        **extra,
    )


def _hand_step_gradient(f64, teachers: list[str], batches: list[dict], *, per_batch_mean=False):
    """The step's gradient in float64, in the engine's optimizer order: the sum over the step's
    target tokens / their number (or, `per_batch_mean`, the mean of each batch's mean)."""
    student = f64("student")
    models_T = [f64(t) for t in teachers]
    sums = [_sums(student, models_T, b) for b in batches]
    if per_batch_mean:
        loss = sum((k + HARD * c) / n for k, c, n in sums) / len(sums)
    else:
        loss = sum(k + HARD * c for k, c, _ in sums) / sum(n for *_, n in sums)
    loss.backward()
    grads = _grads(student)
    return [grads[name] for name in _optimizer_order(student)]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="no gloo")
def test_one_step_gradient_is_the_same_for_batch_accumulation_and_processes(world, f64):
    # (a) one process, batch 8; (b) one process, batch 4 x accumulation 2
    _run(_reduction_recipe(world, "red-8x1", 8, 1), world / "out-red-8x1")
    _run(_reduction_recipe(world, "red-4x2", 4, 2), world / "out-red-4x2")
    # (c) two processes (torchrun, gloo), batch 4 each
    out_c = world / "out-red-2p"
    recipe = _reduction_recipe(world, "red-2p", 4, 1)
    done = torchrun_kdcli(
        ["distill", str(recipe), "--output-dir", str(out_c), "--overwrite", "--json", "--quiet"], world
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["processes"] == 2

    moments = {name: _first_moments(world / f"out-red-{name}") for name in ("8x1", "4x2", "2p")}
    beta1 = moments["8x1"][1]
    assert 0 < beta1 < 1 and all(b == beta1 for _, b in moments.values())
    grads = {name: [m / (1 - beta1) for m in ms] for name, (ms, _) in moments.items()}
    _assert_close_lists(grads["4x2"], grads["8x1"], rtol=1e-4, atol_scale=1e-6, what="batch 4 x accumulation 2")
    _assert_close_lists(grads["2p"], grads["8x1"], rtol=1e-4, atol_scale=1e-6, what="2 processes x batch 4")

    # the rows of step 1 in all three: the first 8 of the seed's permutation (data.train_batches)
    data, collator = _rows(world, "varied.jsonl", "prompt-completion")
    assert len(data.train) == 16
    step_rows = kdata.train_batches(data.train_lengths, 8, 11, 0, False)[0]
    assert kdata.train_batches(data.train_lengths, 4, 11, 0, False)[:2] == [step_rows[:4], step_rows[4:]]
    ranks = [kdata.train_batches(data.train_lengths, 4, 11, 0, False, r, 2)[0] for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(step_rows)
    micro = [collator.batch(data.train, rows) for rows in (step_rows[:4], step_rows[4:])]
    counts = [int((next_token_labels(b["labels"]) != IGNORE_INDEX).sum()) for b in micro]
    rank_counts = [int(sum(data.train[r]["n_targets"] for r in rows)) for rows in ranks]
    assert counts[0] != counts[1] and rank_counts[0] != rank_counts[1]  # so the reduction matters

    # the step's gradient is the mean over the step's target tokens ...
    step_mean = _hand_step_gradient(f64, ["llama"], micro)
    _assert_close_lists(grads["8x1"], step_mean, rtol=2e-3, atol_scale=2e-5, what="hand step mean")
    # ... and a mean of per-micro-batch means would be measurably different
    per_batch = _hand_step_gradient(f64, ["llama"], micro, per_batch_mean=True)
    assert _relative_gap(per_batch, step_mean) > 20 * _relative_gap(grads["8x1"], step_mean)
    assert _relative_gap(grads["4x2"], per_batch) > 1e-2


# --- 4. resume ---------------------------------------------------------------------------------


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(world, monkeypatch):
    path = write_recipe(
        world,
        "resume",
        data={"train": "text-16.jsonl", "eval": None},
        training={"num_steps": 4, "batch_size": 2, "gradient_accumulation_steps": 2, "warmup_ratio": 0.25},
        distillation={
            "intermediate_matches": [
                {"layer_T": 4, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1}
            ]
        },
    )
    straight = world / "out-straight"
    _run(path, straight)

    resumed = world / "out-resumed"
    interrupt_at(monkeypatch, 2)
    with pytest.raises(Interrupted, match="interrupted at step 2 of 4"):
        _run(path, resumed)
    monkeypatch.undo()
    assert (resumed / "checkpoints" / "step-2").is_dir()
    summary = distill.run(load_recipe(path, mode="distill"), output_dir=resumed, resume=True, quiet=True)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4

    want, got = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    assert _losses(resumed) == pytest.approx(_losses(straight), rel=1e-6)


# --- 5. several teachers: the KD target is their mean logits -----------------------------------


def test_two_teachers_distil_towards_their_mean_logits(world, f64, pc_batch):
    student = f64("student")
    teachers = [f64("llama"), f64("llama-b")]
    with (
        FeatureCapture(student, readout=HEAD) as cap_S,
        FeatureCapture(teachers[0], readout=HEAD) as cap_1,
        FeatureCapture(teachers[1], readout=HEAD) as cap_2,
    ):
        feats_S = cap_S.run(pc_batch)
        feats_T = [cap_1.run_teacher(pc_batch), cap_2.run_teacher(pc_batch)]
    total, terms = _objective("forward_kl", {})(0.0, feats_S, feats_T, pc_batch["labels"])
    total.backward()
    got = _grads(student)

    kd_sum, ce_sum, n = _sums(student, teachers, pc_batch)
    want = (kd_sum + HARD * ce_sum) / n
    want.backward()
    want_grads = _grads(student)
    torch.testing.assert_close(terms["kd"], (kd_sum / n).detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(total.detach(), want.detach(), rtol=1e-6, atol=0)
    for name in want_grads:
        torch.testing.assert_close(got[name], want_grads[name], rtol=1e-6, atol=1e-12)
    for alone in teachers:  # neither teacher alone (nor the mean of two KLs) is the target
        kd_alone, _, _ = _sums(student, [alone], pc_batch)
        assert abs(float((kd_alone - kd_sum).detach())) > 1e-3 * float(kd_sum.detach())

    # the run: one step's gradient (AdamW's first moment) is the hand gradient towards the mean logits
    path = _reduction_recipe(world, "multi", 8, 1, teacher=[{"model": "llama"}, {"model": "llama-b"}])
    summary = _run(path, world / "out-multi")
    assert summary["steps"] == 1
    moments, beta1 = _first_moments(world / "out-multi")
    data, collator = _rows(world, "varied.jsonl", "prompt-completion")
    rows = kdata.train_batches(data.train_lengths, 8, 11, 0, False)[0]
    batch = [collator.batch(data.train, rows)]
    mean_grad = _hand_step_gradient(f64, ["llama", "llama-b"], batch)
    engine = [m / (1 - beta1) for m in moments]
    _assert_close_lists(engine, mean_grad, rtol=2e-3, atol_scale=2e-5, what="two teachers")
    first_only = _hand_step_gradient(f64, ["llama"], batch)
    assert _relative_gap(first_only, mean_grad) > 1e-3 > 100 * _relative_gap(engine, mean_grad)


# --- 6. rows without a target are dropped and counted ------------------------------------------


def _no_eos_tokenizer(folder: Path) -> Path:
    """The tiny LM tokenizer without an EOS token (pad stays `<|endoftext|>`), saved to `folder`."""
    tokenizer = tiny_lm_tokenizer()
    tokenizer.eos_token = None
    tokenizer.save_pretrained(folder)
    return folder


def _write_pc(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    return path


def test_rows_without_targets_are_dropped_and_counted(world, tmp_path):
    from transformers import AutoTokenizer

    long_prompt = " ".join(["the good story of a red cat"] * 12) + "\n"
    rows = [
        ("Hello there\n", "How are you?"),
        ("What is it?\n", ""),  # empty completion
        (long_prompt, "A small dog."),  # a long prompt: max_length cuts the prompt, keeps the completion
        ("Tell me\n", ""),  # empty completion
        ("Why?\n", "Because the sun is big."),
    ]
    path = _write_pc(tmp_path / "pc.jsonl", rows)
    source = kdata.Source(str(path), "jsonl")
    cache = str(tmp_path / "cache")

    # with an EOS: an empty completion still has one target (the EOS: learn to stop), none is dropped
    with_eos = AutoTokenizer.from_pretrained(world / "llama")
    data = kdata.prepare_data(
        source, None, with_eos, task="causal-lm", row_format="prompt-completion", max_length=16, cache_dir=cache
    )
    assert data.dropped == {"train": 0} and len(data.train) == 5
    assert data.train[1]["n_targets"] == 1 and data.train[1]["input_ids"][-1] == with_eos.eos_token_id
    assert data.train[2]["length"] == 16 and data.train[2]["n_targets"] == len(with_eos("A small dog.")["input_ids"])

    # without an EOS: the empty completions have no target and are dropped
    no_eos = AutoTokenizer.from_pretrained(_no_eos_tokenizer(tmp_path / "tok"))
    assert no_eos.eos_token_id is None
    data = kdata.prepare_data(
        source, source, no_eos, task="causal-lm", row_format="prompt-completion", max_length=16, cache_dir=cache
    )
    assert data.dropped == {"train": 2, "eval": 2} and len(data.train) == len(data.eval) == 3
    assert all(n > 0 for n in data.train["n_targets"])

    # text rows: an empty text is its BOS alone (no target); max_length 1 leaves no target at all
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("Hello there.", "", "The sun.", "")))
    data = kdata.prepare_data(
        kdata.Source(str(text), "jsonl"), None, with_eos, task="causal-lm", row_format="text", cache_dir=cache
    )
    assert data.dropped == {"train": 2} and len(data.train) == 2
    with pytest.raises(kdata.DataError, match="no row has a target token left"):
        kdata.prepare_data(
            kdata.Source(str(text), "jsonl"), None, with_eos, task="causal-lm", row_format="text", max_length=1
        )


def test_a_run_says_how_many_rows_it_dropped(world, tmp_path, capsys):
    rows = [(f"Tell me about the {w}\n", "" if i % 3 == 0 else f"The {w} is big.") for i, w in enumerate(LM_WORDS[:9])]
    _write_pc(world / "pc-empty.jsonl", rows)  # rows 0, 3, 6 have an empty completion
    _write_pc(world / "pc-empty-eval.jsonl", rows[:4])  # rows 0, 3
    _no_eos_tokenizer(world / "tok-no-eos")
    path = write_recipe(
        world,
        "dropped",
        tokenizer="tok-no-eos",
        data={"train": "pc-empty.jsonl", "eval": "pc-empty-eval.jsonl", "row_format": "prompt-completion"},
        training={"num_steps": 1, "batch_size": 4},
    )
    summary = _run(path, world / "out-dropped")
    assert summary["train_examples"] == 6
    assert summary["dropped_rows"] == {"train": 3, "eval": 2}
    stderr = capsys.readouterr().err
    dropped = [line for line in stderr.splitlines() if "dropped" in line]
    assert any(re.search(r"\b3\b", line) and "train" in line for line in dropped), stderr
    assert any(re.search(r"\b2\b", line) and "eval" in line for line in dropped), stderr


# --- 7. eval metrics = a direct computation ----------------------------------------------------


def _direct_metrics(student, teachers, batches) -> dict[str, float]:
    """perplexity = exp(mean NLL of the targets), kl = mean KL(teacher || student) per target
    token (teachers' mean logits, T = 1), top-1 agreement; from full float64 logits (KL and
    agreement on the ids every head has, a padded head's extra rows left out)."""
    nll, kl, agree, tokens = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for batch in batches:
            targets = next_token_labels(batch["labels"])
            keep = targets != IGNORE_INDEX
            z_S = _logits(student, batch)[keep]
            shared = min(z_S.shape[-1], *(t.config.vocab_size for t in teachers))
            z_T = (sum(_logits(t, batch)[..., :shared] for t in teachers) / len(teachers))[keep]
            nll += float(-F.log_softmax(z_S, -1).gather(-1, targets[keep][:, None]).sum())
            z_S = z_S[:, :shared]
            log_q, log_p = F.log_softmax(z_S, -1), F.log_softmax(z_T, -1)
            kl += float((log_p.exp() * (log_p - log_q)).sum())
            agree += int((z_S.argmax(-1) == z_T.argmax(-1)).sum())
            tokens += int(keep.sum())
    return {"tokens": tokens, "perplexity": math.exp(nll / tokens), "kl": kl / tokens, "top1_agreement": agree / tokens}


@pytest.mark.parametrize(
    ("v_T", "v_S", "distillation"),
    [
        (576, 512, {"kd_loss_type": "forward_kl"}),
        (512, 576, {"kd_loss_type": "jsd", "kd_loss_options": {"top_k": 8}}),
        (576, 512, {"kd_loss_options": {"top_k": 8, "top_k_mode": "tail"}, "teacher_cache": {"top_k": 8}}),
    ],
    ids=["teacher>student", "student>teacher", "teacher>student-cached"],
)
def test_padded_vocabularies_lint_distil_and_evaluate_on_the_shared_ids(world, tmp_path, v_T, v_S, distillation):
    """One tokenizer (512 ids), heads of 576 and 512 rows: check-recipe said valid, distill
    crashed at step 1 (head_T has V = 576 but 512). The eval KL and top-1 compare the shared ids."""
    from kdcli.recipe import check_file

    teacher = make_tiny_lm(tmp_path / "teacher", layers=2, vocab=v_T, seed=3)
    student = make_tiny_lm(tmp_path / "student", layers=1, vocab=v_S, seed=4)
    path = write_recipe(
        world,
        f"padded-{v_T}-{v_S}",
        teacher={"model": str(teacher)},
        student={"model": str(student)},
        data={"train": "messages-train.jsonl", "eval": "messages-eval.jsonl", "row_format": "messages"},
        training={"num_steps": 2},
        distillation=distillation,
    )
    report, _ = check_file(path)
    assert report.valid and not [p for p in report.problems if p.severity == "error"], report.problems
    out = tmp_path / "out"
    summary = _run(path, out)
    assert all(math.isfinite(r) for r in _losses(out))
    data, collator = _rows(world, "messages-eval.jsonl", "messages")
    single = [collator.batch(data.train, [i]) for i in range(len(data.train))]
    want = _direct_metrics(_lm(out), [_lm(teacher)], single)
    ev = summary["eval"]
    assert ev["kl"] == pytest.approx(want["kl"], rel=1e-4) and ev["perplexity"] == pytest.approx(
        want["perplexity"], rel=1e-4
    )
    assert ev["top1_agreement"] == pytest.approx(want["top1_agreement"], abs=1.01 / want["tokens"])


def test_eval_metrics_equal_a_direct_computation(world, f64):
    data, collator = _rows(world, "messages-eval.jsonl", "messages")
    student, teacher = f64("student"), f64("llama-sharp")
    padded = [collator.batch(data.train, rows) for rows in kdata.eval_batches(len(data.train), 4)]
    single = [collator.batch(data.train, [i]) for i in range(len(data.train))]  # no padding at all
    want = _direct_metrics(student, [teacher], single)
    assert want["tokens"] == sum(data.train["n_targets"]) > 0

    with FeatureCapture(student, readout=HEAD) as cap_S, FeatureCapture(teacher, readout=HEAD) as cap_T:
        got = evaluate_lm(((cap_S.run(b), [cap_T.run(b)], b["labels"]) for b in padded), chunk_size=7)
        alone = evaluate_lm((cap_T.run(b), None, b["labels"]) for b in padded)
    assert got["tokens"] == want["tokens"]
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    assert got["nll"] == pytest.approx(math.log(want["perplexity"]), rel=1e-5)
    assert got["kl"] == pytest.approx(want["kl"], rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(want["top1_agreement"], abs=1e-12)
    teacher_want = _direct_metrics(teacher, [teacher], single)
    assert alone.keys() == {"tokens", "nll", "perplexity"}
    assert alone["perplexity"] == pytest.approx(teacher_want["perplexity"], rel=1e-5)

    # the run's summary: the final student (saved) against the teacher, eval_batch_size 4 (padded)
    path = write_recipe(
        world,
        "eval",
        teacher={"model": "llama-sharp"},
        student={"model": "student"},
        data={"train": "messages-train.jsonl", "eval": "messages-eval.jsonl", "row_format": "messages"},
        training={"num_steps": 1},
    )
    out = world / "out-eval"
    summary = _run(path, out)
    trained = _lm(out)
    run_want = _direct_metrics(trained, [teacher], single)
    ev = summary["eval"]
    assert ev["tokens"] == run_want["tokens"] == want["tokens"]
    assert ev["perplexity"] == pytest.approx(run_want["perplexity"], rel=1e-4)
    assert ev["kl"] == pytest.approx(run_want["kl"], rel=1e-4)
    assert ev["top1_agreement"] == pytest.approx(run_want["top1_agreement"], abs=1.01 / run_want["tokens"])
    assert summary["teacher_eval"]["perplexity"] == pytest.approx(teacher_want["perplexity"], rel=1e-4)
    assert summary["teacher_eval"]["tokens"] == want["tokens"]
