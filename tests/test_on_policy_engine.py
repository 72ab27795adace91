"""On-policy distillation in the run (`kdcli.engine.generate`, issue 18): generated rows follow
the shift rule with their padding masked, hard labels stay on dataset rows, shares 0/0 are
today's run, student_share 1 trains on generated tokens only, the step's gradient is the same
for batch / accumulation / two processes for a fixed set of generated rows, and resume is exact."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from kdcli import distill
from kdcli.engine import generate
from kdcli.errors import Interrupted, UsageError
from kdcli.features import HEAD, FeatureCapture
from kdcli.objective import Objective
from kdcli.recipe import DistillationConfig, load_recipe
from kdcli.run_files.checkpoint import load_checkpoint
from kdcli.tasks import IGNORE_INDEX, task_for
from kdcli.tasks.lm_kd import count_targets
from kdcli.tasks.lm_rows import generated_row, generation_prompt, next_token_labels, prompt_length
from launch import torchrun_kdcli
from tiny import interrupt_at, make_tiny_lm, tiny_lm_tokenizer, write_lm_rows


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("on_policy")
    make_tiny_lm(root / "llama", "llama", layers=2, hidden=32)
    make_tiny_lm(root / "student", "llama", layers=1, hidden=32, seed=5)
    write_lm_rows(root / "pc.jsonl", "prompt-completion", 16, seed=1)
    write_lm_rows(root / "chat.jsonl", "messages", 8, seed=2)
    return root


def write_recipe(root: Path, name: str, on_policy: dict | None, **training) -> Path:
    recipe = {
        "task": "causal-lm",
        "teacher": {"model": "llama"},
        "student": {"model": "student"},
        "data": {"train": "pc.jsonl", "row_format": "prompt-completion", "max_length": 48, "group_by_length": False},
        "training": {
            "num_steps": 2,
            "batch_size": 4,
            "learning_rate": 2e-3,
            "warmup_ratio": 0.0,
            "log_every": 1,
            "device": "cpu",
            "precision": "fp32",
            "seed": 3,
            **training,
        },
        "distillation": {
            "kd_loss_type": "forward_kl",
            "temperature": 1.0,
            "hard_label_weight": 0.5,
            "chunk_size": 16,
            **({"on_policy": on_policy} if on_policy is not None else {}),
        },
    }
    path = root / f"{name}.json"
    path.write_text(json.dumps(recipe, indent=1))
    return path


def run(path: Path, out: Path, **kwargs) -> dict:
    return distill.run(load_recipe(path, mode="distill"), output_dir=out, overwrite=True, quiet=True, **kwargs)


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


# --- rows ----------------------------------------------------------------------------------------


def test_the_prompt_is_everything_before_the_last_completion():
    labels = [IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX, IGNORE_INDEX, 11, 12, 13]
    assert prompt_length(labels) == 6
    assert generation_prompt(list(range(9)), labels, room=4) == [2, 3, 4, 5]  # the prompt's end is kept
    row = generated_row([1, 2], [5, 6, 0])
    assert row["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 5, 6, 0] and row["n_targets"] == 3


def test_roles_follow_the_shares_and_the_seed():
    def roles(seed, n=1000, s=0.3, t=0.2):
        return generate.choose_roles(n, s, t, torch.Generator().manual_seed(seed))

    first = roles(1)
    assert first == roles(1) and first != roles(2)
    assert (first.count("student"), first.count("teacher")) in ((300, 200), (301, 200), (300, 201), (301, 201))
    assert roles(1, s=0.0, t=0.0) == ["data"] * 1000 and roles(1, s=1.0, t=0.0) == ["student"] * 1000
    # small steps keep the shares in expectation
    counts = [roles(k, n=2, s=0.25, t=0.0).count("student") for k in range(400)]
    assert 0.18 < sum(counts) / 800 < 0.32


def test_a_tokenizer_without_an_end_marker_is_refused_before_step_one():
    tokenizer = tiny_lm_tokenizer()
    assert generate.stop_ids(tokenizer, "messages") == [0, 2]  # <|endoftext|> and ChatML's <|im_end|>
    tokenizer.eos_token = None
    with pytest.raises(UsageError, match="distillation.on_policy: the tokenizer has no end-of-sequence token"):
        generate.stop_ids(tokenizer, "prompt-completion")
    procs = SimpleNamespace(rank=0, world_size=1, distributed=False)
    with pytest.raises(UsageError, match="row_format 'text' rows have no prompt to complete"):
        generate.OnPolicy(SimpleNamespace(max_new_tokens=4), tokenizer, "text", 32, 0, procs, False)
    flat = tiny_lm_tokenizer(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(UsageError, match="renders no generation prompt"):
        generate.stop_ids(flat, "messages")


def _fake_run(world: Path, max_new_tokens: int, student_share: float = 1.0):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdcli import data as kdata

    tokenizer = AutoTokenizer.from_pretrained(world / "llama")
    data = kdata.prepare_data(
        kdata.Source(str(world / "chat.jsonl"), "jsonl"),
        None,
        tokenizer,
        task="causal-lm",
        row_format="messages",
        max_length=48,
        cache_dir=str(world / "hf-cache"),
    )
    student = AutoModelForCausalLM.from_pretrained(world / "student")
    config = SimpleNamespace(
        student_share=student_share,
        teacher_share=0.0,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
    )
    procs = SimpleNamespace(rank=0, world_size=1, distributed=False)
    on_policy = generate.OnPolicy(config, tokenizer, "messages", 48, 3, procs, False)
    fake = SimpleNamespace(student=student, teachers=[], device=torch.device("cpu"), sharded=False)
    fake.autocast_precision = "fp32"
    return fake, on_policy, data, kdata.Collator.for_tokenizer(tokenizer)


def test_generated_rows_follow_the_shift_rule_with_padding_masked(world):
    fake, on_policy, data, collator = _fake_run(world, max_new_tokens=20)
    rows = [[data.train[i] for i in range(4)], [data.train[i] for i in range(4, 8)]]
    out = on_policy.rows_of_step(fake, 0, rows)
    assert [len(b) for b in out] == [4, 4] and all(r["generated"] for b in out for r in b)
    completions = 0
    for source, row in zip([r for b in rows for r in b], [r for b in out for r in b]):
        p = prompt_length(row["labels"])
        prompt = source["input_ids"][: prompt_length(source["labels"])]
        assert row["input_ids"][:p] == prompt[-(48 - 20) :]  # the prompt, its end kept: the row fits max_length
        assert row["labels"][p:] == row["input_ids"][p:] and len(row["input_ids"]) - p <= 20
        assert row["input_ids"][p - 3 : p] == list(prompt[-3:])  # ... ends with the generation prompt (no target)
        completions += len(row["input_ids"]) - p
    assert on_policy.figures.tokens == completions and on_policy.figures.completions == 8
    batch = generate.collate(collator, out[0])
    targets = next_token_labels(batch["labels"])
    assert count_targets(batch["labels"]) == sum(r["n_targets"] for r in out[0])
    assert bool((targets[batch["attention_mask"].roll(-1, dims=1) == 0] == IGNORE_INDEX).all())  # padding: no target
    again = on_policy.rows_of_step(fake, 0, rows)
    assert again == out  # seeded by (seed, step, rank)
    assert on_policy.rows_of_step(fake, 1, rows) != out


def test_completions_cut_at_max_new_tokens_have_no_end_marker(world):
    fake, on_policy, data, _ = _fake_run(world, max_new_tokens=2)
    out = on_policy.rows_of_step(fake, 0, [[data.train[i] for i in range(8)]])[0]
    figures = on_policy.read_figures(SimpleNamespace(distributed=False, world_size=1), "cpu")
    for row in out:
        completion = row["input_ids"][prompt_length(row["labels"]) :]
        assert 1 <= len(completion) <= 2
        if len(completion) < 2:  # ended early: its end marker is its last token (and a target)
            assert completion[-1] in on_policy.stops and row["labels"][-1] == completion[-1]
    ended = sum(r["input_ids"][-1] in on_policy.stops for r in out)
    assert figures["completions_ended"] == ended / 8 and figures["completion_length"] <= 2


def test_hard_labels_apply_to_dataset_rows_only(world):
    """The objective with `generated` rows = KD over every target + CE over the dataset rows' targets."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(world / "student", dtype=torch.float32).double()
    teacher = AutoModelForCausalLM.from_pretrained(world / "llama", dtype=torch.float32).double()
    config = DistillationConfig(kd_loss_type="forward_kl", temperature=1.0, hard_label_weight=0.5, chunk_size=7)
    objective = Objective(config, kd_term=task_for("causal-lm").kd_term(config))
    ids = torch.randint(4, 500, (3, 12))
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    labels[2, 9:] = IGNORE_INDEX
    generated = torch.tensor([False, True, False])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    feats_S = FeatureCapture(student, [], [], readout=HEAD).run(batch)
    feats_T = FeatureCapture(teacher, [], [], readout=HEAD).run(batch)
    total, terms = objective(0.0, feats_S, [feats_T], labels, generated=generated)

    targets = next_token_labels(labels)
    keep = targets != IGNORE_INDEX
    log_q = student(**batch).logits.log_softmax(-1)[keep]
    log_p = teacher(**batch).logits.log_softmax(-1)[keep]
    kd = (log_p.exp() * (log_p - log_q)).sum(-1)
    ce = -log_q.gather(-1, targets[keep][:, None])[:, 0]
    dataset = ~generated[torch.arange(3)[:, None].expand(3, 12)[keep]]
    n = int(keep.sum())
    assert 0 < int(dataset.sum()) < n
    torch.testing.assert_close(terms["kd"].double(), kd.sum() / n)
    torch.testing.assert_close(terms["hard_label"].double(), ce[dataset].sum() / n)
    torch.testing.assert_close(total.double(), (kd.sum() + 0.5 * ce[dataset].sum()) / n)


def test_repetition_is_the_share_of_repeated_4_grams():
    from kdcli.engine.generation_eval import repetition

    assert repetition([[1, 2, 3, 4, 1, 2, 3, 4]]) == pytest.approx(1 / 5)  # 5 4-grams, "1 2 3 4" twice
    assert repetition([[1, 2, 3], [5, 5, 5, 5, 5, 5]]) == pytest.approx(2 / 3)
    assert repetition([]) == 0.0


# --- runs ----------------------------------------------------------------------------------------


def test_shares_zero_reproduce_the_off_policy_run(world):
    off = run(write_recipe(world, "off", None), world / "out-off")
    zero = run(
        write_recipe(world, "zero", {"student_share": 0, "teacher_share": 0, "max_new_tokens": 8}), world / "out-zero"
    )
    assert off["steps"] == zero["steps"] == 2
    got, want = metrics(world / "out-zero"), metrics(world / "out-off")
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-7, abs=1e-7)
        assert "generated_tokens_per_s" not in g


def test_student_share_one_trains_on_generated_tokens_only(world, monkeypatch):
    from kdcli.engine import step as step_module

    normalisers = []
    original = step_module.step_targets
    monkeypatch.setattr(
        step_module, "step_targets", lambda run, b: normalisers.append(original(run, b)) or normalisers[-1]
    )
    path = write_recipe(world, "all", {"student_share": 1, "max_new_tokens": 6}, num_steps=2)
    doc = json.loads(path.read_text())
    doc["data"]["eval"] = "pc.jsonl"
    doc["data"]["max_eval_samples"] = 4
    path.write_text(json.dumps(doc))
    summary = run(path, world / "out-all")
    # the eval block: on-policy KL on the student's samples, greedy repetition and endings; the teacher's once
    assert summary["eval"]["on_policy_kl"] > 0 and "on_policy_kl" not in summary["teacher_eval"]
    for block in (summary["eval"], summary["teacher_eval"]):
        assert 0 <= block["repetition_4gram"] <= 1 and 0 <= block["greedy_ended"] <= 1
    rows = metrics(world / "out-all")
    for row, normaliser in zip(rows, normalisers, strict=True):
        assert row["loss/hard_label"] == 0.0 and row["loss/kd"] > 0
        assert normaliser == pytest.approx(row["completion_length"] * 4)  # the step's targets: its completions
        assert 0 < row["generation_share"] < 1 and row["generated_tokens_per_s"] > 0
        assert 0 <= row["completions_ended"] <= 1


def _first_moments(out: Path) -> list[torch.Tensor]:
    state = load_checkpoint(out / "checkpoints" / "step-1").optimizer
    beta1 = state["param_groups"][0]["betas"][0]
    order = [i for group in state["param_groups"] for i in group["params"]]
    return [state["state"][i]["exp_avg"] / (1 - beta1) for i in order]


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="no gloo")
def test_one_step_gradient_is_the_same_for_accumulation_and_processes(world):
    """top_k 1 makes every completion the student's greedy one: the same generated rows whichever
    process or micro-batch generates them."""
    on_policy = {"student_share": 1, "max_new_tokens": 10, "top_k": 1}
    common = {"num_steps": 1, "max_grad_norm": 0.0, "save_every": 1}
    run(write_recipe(world, "g-8x1", on_policy, batch_size=8, **common), world / "out-g-8x1")
    run(
        write_recipe(world, "g-4x2", on_policy, batch_size=4, gradient_accumulation_steps=2, **common),
        world / "out-g-4x2",
    )
    path = write_recipe(world, "g-2p", on_policy, batch_size=4, **common)
    done = torchrun_kdcli(
        ["distill", str(path), "--output-dir", str(world / "out-g-2p"), "--overwrite", "--json", "--quiet"], world
    )
    assert done.returncode == 0, done.stderr[-3000:]
    want = _first_moments(world / "out-g-8x1")
    scale = max(float(w.abs().max()) for w in want)
    for name in ("4x2", "2p"):
        got = _first_moments(world / f"out-g-{name}")
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * scale)
    lengths = {n: metrics(world / f"out-g-{n}")[0]["completion_length"] for n in ("8x1", "4x2", "2p")}
    assert len(set(lengths.values())) == 1, lengths


def test_resume_equals_an_uninterrupted_run(world, monkeypatch):
    on_policy = {"student_share": 0.5, "teacher_share": 0.25, "max_new_tokens": 8, "top_p": 0.9}
    path = write_recipe(world, "resume", on_policy, num_steps=4, batch_size=2, gradient_accumulation_steps=2)
    run(path, world / "out-straight")
    interrupt_at(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run(path, world / "out-resumed")
    monkeypatch.undo()
    summary = distill.run(load_recipe(path, mode="distill"), output_dir=world / "out-resumed", resume=True, quiet=True)
    assert summary["resumed_from_step"] == 2
    want, got = (
        load_file(world / "out-straight" / "model.safetensors"),
        load_file(world / "out-resumed" / "model.safetensors"),
    )
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    straight = {r["step"]: r for r in metrics(world / "out-straight")}
    resumed = {r["step"]: r for r in metrics(world / "out-resumed")}
    assert set(resumed) == set(straight) == {1, 2, 3, 4}
    for step, a in straight.items():
        assert (a["loss"], a["completion_length"]) == (resumed[step]["loss"], resumed[step]["completion_length"])


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="no gloo")
def test_fsdp_generates_through_the_sharded_models(world):
    """Two FSDP2 processes (gloo) generate through the sharded student and teacher: greedy
    (top_k 1) completions and the step's loss equal one process's."""
    on_policy = {"student_share": 0.5, "teacher_share": 0.5, "max_new_tokens": 10, "top_k": 1}
    common = {"num_steps": 1, "max_grad_norm": 0.0}
    one = run(write_recipe(world, "f-1", on_policy, batch_size=8, **common), world / "out-f-1")
    path = write_recipe(world, "f-2p", on_policy, batch_size=4, parallel="fsdp", **common)
    done = torchrun_kdcli(
        ["distill", str(path), "--output-dir", str(world / "out-f-2p"), "--overwrite", "--json", "--quiet"], world
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["processes"] == 2 and one["steps"] == 1
    got, want = metrics(world / "out-f-2p")[0], metrics(world / "out-f-1")[0]
    assert got["completion_length"] == want["completion_length"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_the_teacher_cache_serves_dataset_rows_only(world, capfd):
    """Generated rows run the teacher and are never stored under their dataset row's index."""
    path = write_recipe(world, "cache", {"student_share": 1, "max_new_tokens": 6}, num_steps=2)
    doc = json.loads(path.read_text())
    doc["distillation"].update(kd_loss_options={"top_k": 8}, teacher_cache={"top_k": 8, "dtype": "fp32"})
    path.write_text(json.dumps(doc))
    summary = distill.run(load_recipe(path, mode="distill"), output_dir=world / "out-cache", overwrite=True)
    assert summary["teacher_cache_rows"] == 0
    assert "the teacher cache serves the dataset's share of rows only" in capfd.readouterr().err
