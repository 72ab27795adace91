"""FSDP2 (`training.parallel: "fsdp"`): two gloo processes on CPU give the weights of one
process with the same global batch, a sharded checkpoint resumes exactly, the gathered student
saves and loads without kdcli, and what FSDP2 refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdcli import distill
from kdcli.recipe import check_file, load_recipe
from launch import torchrun_kdcli
from tiny import make_tiny_lm, write_lm_rows

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="no gloo"
)


def _recipe(root: Path, name: str, batch: int, *, match: bool = False, **training) -> Path:
    """A causal-lm distill recipe; `match` adds a hidden-state match (a batch mean per process,
    so it weighs tokens differently when the rows are split: not in the 1-vs-2 comparison)."""
    doc = {
        "task": "causal-lm",
        "teacher": {"model": "./teacher"},
        "student": {"config": "./teacher", "overrides": {"num_hidden_layers": 2}, "init_from_teacher": [2, 4]},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "row_format": "prompt-completion", "max_length": 48},
        "training": {
            "num_steps": 4,
            "batch_size": batch,
            "device": "cpu",
            "precision": "fp32",
            "log_every": 1,
            "eval_every": 2,
            "save_every": 2,
            "max_grad_norm": 1.0,
            **training,
        },
        "distillation": {
            "kd_loss_type": "jsd",
            "kd_loss_options": {"beta": 0.4},
            "temperature": 2.0,
            "hard_label_weight": 0.3,
            "chunk_size": 16,
            "intermediate_matches": [{"layer_T": 4, "layer_S": 2, "feature": "hidden", "loss": "cos", "weight": 1}]
            if match
            else [],
        },
    }
    path = root / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    make_tiny_lm(root / "teacher", "llama", layers=4, hidden=32)
    write_lm_rows(root / "train.jsonl", "prompt-completion", 32)
    write_lm_rows(root / "eval.jsonl", "prompt-completion", 8, seed=1)
    return root


def _fsdp(ws: Path, name: str, out: Path, *extra: str) -> dict:
    done = torchrun_kdcli(["distill", str(ws / f"{name}.json"), "-o", str(out), "--json", "--quiet", *extra], ws)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_two_sharded_processes_match_one_process(ws):
    _recipe(ws, "fsdp", 2, parallel="fsdp")
    one = distill.run(load_recipe(_recipe(ws, "one", 4)), output_dir=ws / "out-one", overwrite=True, quiet=True)
    two = _fsdp(ws, "fsdp", ws / "out-fsdp")
    assert two["processes"] == 2 and two["steps"] == 4
    assert _losses(ws / "out-fsdp") == pytest.approx(_losses(ws / "out-one"), rel=1e-5)
    assert two["eval"]["kl"] == pytest.approx(one["eval"]["kl"], rel=1e-4)
    a, b = load_file(ws / "out-fsdp" / "model.safetensors"), load_file(ws / "out-one" / "model.safetensors")
    assert sorted(a) == sorted(b)  # tied head saved once, as from one process
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    # every rank wrote its shards into the checkpoint, which holds no unsharded copy
    step = ws / "out-fsdp" / "checkpoints" / "step-4"
    assert sorted(p.name for p in (step / "shards").iterdir() if p.suffix == ".distcp") == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert torch.load(step / "state.pt", weights_only=True)["sharded"] is True


def test_a_sharded_checkpoint_resumes_exactly(ws):
    _recipe(ws, "fsdp", 2, parallel="fsdp", match=True)
    full = ws / "out-full"
    _fsdp(ws, "fsdp", full)
    again = ws / "out-again"
    shutil.copytree(full, again)
    shutil.rmtree(again / "checkpoints" / "step-4")  # as if the run had stopped after step 2's checkpoint
    (again / "model.safetensors").unlink()
    summary = _fsdp(ws, "fsdp", again, "--resume")
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    a, b = load_file(full / "model.safetensors"), load_file(again / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_the_gathered_student_loads_without_kdcli(ws):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = ws / "out-fsdp"
    if not (out / "model.safetensors").exists():
        _recipe(ws, "fsdp", 2, parallel="fsdp")
        _fsdp(ws, "fsdp", out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and model.lm_head.weight is model.model.embed_tokens.weight
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("the cat", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 3


def test_fsdp_refuses_fp16_and_a_ddp_checkpoint(ws):
    report, _ = check_file(_recipe(ws, "fp16", 2, parallel="fsdp", precision="fp16"))
    assert [p.path for p in report.problems if p.severity == "error"] == ["training.precision"]
    # a ddp run's checkpoint cannot be resumed sharded
    _recipe(ws, "ddp2", 2)
    ddp = ws / "out-ddp"
    done = torchrun_kdcli(
        ["distill", str(ws / "ddp2.json"), "-o", str(ddp), "--json", "--quiet", "--max-steps", "2"], ws
    )
    assert done.returncode == 0, done.stderr[-2000:]
    _recipe(ws, "ddp2", 2, parallel="fsdp")
    done = torchrun_kdcli(["distill", str(ws / "ddp2.json"), "-o", str(ddp), "--json", "--quiet", "--resume"], ws)
    assert done.returncode == 1
    assert "unsharded (ddp) state" in json.loads(done.stdout)["error"]["message"]


def test_bf16_is_fsdp2s_mixed_precision_policy():
    from kdcli.engine.fsdp import mixed_precision

    policy = mixed_precision("bf16")
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert mixed_precision("fp32") is None


@pytest.mark.slow
def test_a_bf16_sharded_run_learns_as_the_fp32_one(ws):
    _recipe(ws, "bf16", 2, parallel="fsdp", precision="bf16")
    _recipe(ws, "fsdp", 2, parallel="fsdp")
    bf16 = _fsdp(ws, "bf16", ws / "out-bf16")
    fp32 = _fsdp(ws, "fsdp", ws / "out-fp32")
    assert bf16["precision"] == "bf16"
    assert bf16["final_loss"] == pytest.approx(fp32["final_loss"], rel=2e-2)
