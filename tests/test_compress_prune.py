"""`kdcli.compress`: Minitron width/depth pruning of tiny Llama and Qwen2 models.

- a prune that keeps everything is the source (logits to 1e-6), tied or untied, GQA or not;
- pruning only MLP channels = the source with those channels zeroed (1e-5); pruning only
  query heads / whole KV groups = the source with those heads' o_proj columns zeroed;
- hidden channels: embeddings, norms and the head (tied stays tied) sliced on the same set;
- the importance is what a direct computation gives; the pruned student saves and loads with
  plain `AutoModelForCausalLM.from_pretrained`; `kdcli distill` with student.prune end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from kdcli.compress.importance import measure_importance
from kdcli.compress.prune import prune_model
from kdcli.recipe.prune_schema import PruneSpec
from tiny import make_tiny_lm, write_lm_rows


def _model(arch: str = "llama", *, tie: bool = True, heads: int = 4, kv: int = 2, seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from tiny import tiny_lm_config

    config = tiny_lm_config(arch, vocab=64, layers=3, hidden=32, heads=heads, kv_heads=kv, tie=tie)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float64, attn_implementation="sdpa")
        for p in model.parameters():  # random norms and biases too: nothing is trivially 1 or 0
            p.data.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _batches(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 64, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 3:] = 0
    return lambda: iter(
        [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]
    )


IDS = torch.randint(4, 64, (2, 9), generator=torch.Generator().manual_seed(3))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize(
    ("arch", "tie", "kv"), [("llama", True, 2), ("llama", False, 4), ("qwen2", False, 1), ("mistral", False, 2)]
)
def test_keeping_everything_is_the_source(arch: str, tie: bool, kv: int) -> None:
    source = _model(arch, tie=tie, kv=kv)
    student, plan = prune_model(source, PruneSpec(), _batches())
    assert torch.allclose(_logits(student), _logits(source), atol=1e-6, rtol=0)
    assert plan.layers == (1, 2, 3) and plan.hidden == list(range(32))
    assert student.config.tie_word_embeddings == tie


def _zeroed(source: nn.Module, keep: dict) -> nn.Module:
    import copy

    model = copy.deepcopy(source)
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            if "mlp" in keep:
                drop = [c for c in range(block.mlp.down_proj.in_features) if c not in keep["mlp"][i]]
                block.mlp.down_proj.weight[:, drop] = 0
            if "heads" in keep:
                hd = getattr(model.config, "head_dim", None) or 32 // model.config.num_attention_heads
                for h in range(model.config.num_attention_heads):
                    if h not in keep["heads"][i]:
                        block.self_attn.o_proj.weight[:, h * hd : (h + 1) * hd] = 0
    return model


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_pruning_mlp_channels_equals_zeroing_them(arch: str) -> None:
    source = _model(arch)
    student, plan = prune_model(source, PruneSpec(intermediate_size=40), _batches())
    assert [len(m) for m in plan.mlp] == [40, 40, 40]
    assert student.model.layers[0].mlp.down_proj.weight.shape == (32, 40)
    assert torch.allclose(_logits(student), _logits(_zeroed(source, {"mlp": plan.mlp})), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("heads", "kv", "per_group"), [(2, 1, 2), (2, 2, 1), (4, 4, 1)])
def test_gqa_groups_are_pruned_with_their_heads(heads: int, kv: int, per_group: int) -> None:
    source = _model("qwen2", heads=8, kv=4) if heads == 4 else _model("llama", heads=4, kv=2)
    group = source.config.num_attention_heads // source.config.num_key_value_heads
    student, plan = prune_model(source, PruneSpec(num_attention_heads=heads, num_key_value_heads=kv), _batches())
    for kept_heads, groups in zip(plan.heads, plan.kv):
        assert len(groups) == kv and len(kept_heads) == heads
        # student head j sits in student group j // per_group = source group groups[j // per_group]
        assert [h // group for h in kept_heads] == [groups[j // per_group] for j in range(heads)]
    hd = getattr(source.config, "head_dim", None) or 32 // source.config.num_attention_heads
    assert student.config.head_dim == hd
    assert student.model.layers[0].self_attn.k_proj.weight.shape == (kv * hd, 32)
    expected = _logits(_zeroed(source, {"heads": plan.heads}))
    if kv < source.config.num_key_value_heads or per_group < group:
        assert torch.allclose(_logits(student), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_hidden_channels_slice_embeddings_norms_and_head(tie: bool) -> None:
    source = _model(tie=tie)
    student, plan = prune_model(source, PruneSpec(hidden_size=20), _batches())
    kept = plan.hidden
    assert len(kept) == 20 and kept == sorted(kept)
    assert torch.equal(student.model.embed_tokens.weight, source.model.embed_tokens.weight[:, kept])
    assert torch.equal(student.lm_head.weight, source.lm_head.weight[:, kept])
    assert torch.equal(student.model.norm.weight, source.model.norm.weight[kept])
    block_s, block_t = student.model.layers[1], source.model.layers[1]
    assert torch.equal(block_s.post_attention_layernorm.weight, block_t.post_attention_layernorm.weight[kept])
    assert torch.equal(block_s.self_attn.o_proj.weight, block_t.self_attn.o_proj.weight[kept])
    assert torch.equal(block_s.mlp.gate_proj.weight, block_t.mlp.gate_proj.weight[:, kept])
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tie
    assert plan.summary["hidden_kept_share"] < 1.0


def test_mistral_heads_and_kv_groups_equal_zeroing_them() -> None:
    """Mistral shares Llama's block layout (q/k/v/o, gate/up/down, RMSNorm): dropping a KV group
    with its query heads equals zeroing those heads' o_proj columns in the source."""
    source = _model("mistral", heads=4, kv=2)
    assert source.config.model_type == "mistral"
    student, plan = prune_model(source, PruneSpec(num_attention_heads=2, num_key_value_heads=1), _batches())
    assert type(student).__name__ == "MistralForCausalLM" and student.config.num_key_value_heads == 1
    assert torch.allclose(_logits(student), _logits(_zeroed(source, {"heads": plan.heads})), atol=1e-5, rtol=0)


def test_depth_and_width_together() -> None:
    source = _model("qwen2")
    spec = PruneSpec(num_hidden_layers=2, hidden_size=24, intermediate_size=32, depth_by="evenly_spaced")
    student, plan = prune_model(source, spec, _batches())
    assert plan.layers == (2, 3) and len(student.model.layers) == 2
    s_block, t_block = student.model.layers[0], source.model.layers[1]
    rows = [h * 8 + j for h in plan.heads[0] for j in range(8)]
    assert torch.equal(s_block.self_attn.q_proj.bias, t_block.self_attn.q_proj.bias[rows])
    assert torch.equal(s_block.mlp.up_proj.weight, t_block.mlp.up_proj.weight[plan.mlp[0]][:, plan.hidden])
    doc = plan.to_dict()
    assert doc["layers"] == [2, 3] and doc["depth"]["by"] == "evenly_spaced"
    assert json.loads(json.dumps(doc)) == doc


def test_importance_is_the_direct_computation() -> None:
    """Block 2's MLP channels and heads, and the embedding channels, recomputed from the
    block's own modules fed the captured inputs (float64, real tokens only)."""
    source = _model()
    batches = _batches()
    imp = measure_importance(source, batches())
    block = source.model.layers[1]
    mlp, heads = torch.zeros(64, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    hidden, tokens = torch.zeros(32, dtype=torch.float64), 0
    seen: dict[str, list] = {"mlp": [], "attn": [], "norms": []}
    handles = [
        block.mlp.register_forward_pre_hook(lambda m, a: seen["mlp"].append(a[0])),
        block.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen["attn"].append(a[0])),
    ]
    for module in source.modules():
        if type(module).__name__.endswith("RMSNorm"):
            handles.append(module.register_forward_hook(lambda m, a, out: seen["norms"].append(out)))
    for batch in batches():
        for captured in seen.values():
            captured.clear()
        with torch.no_grad():
            source(**batch)
        real = batch["attention_mask"].bool()
        tokens += int(real.sum())
        x = seen["mlp"][0]
        mlp += (block.mlp.act_fn(block.mlp.gate_proj(x)) * block.mlp.up_proj(x))[real].abs().sum(0)
        heads += seen["attn"][0][real].view(-1, 4, 8).norm(dim=-1).sum(0)
        hidden += sum(out[real].abs().sum(0) for out in seen["norms"])
    for h in handles:
        h.remove()
    assert imp.tokens == tokens == 29
    assert torch.allclose(imp.mlp[1], mlp / tokens, rtol=1e-9)
    assert torch.allclose(imp.heads[1], heads / tokens, rtol=1e-9)
    assert torch.allclose(imp.hidden, hidden / tokens, rtol=1e-9)


def test_pruned_student_saves_and_loads_with_plain_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    source = _model("llama", heads=4, kv=2)
    spec = PruneSpec(num_hidden_layers=2, hidden_size=24, num_attention_heads=2, num_key_value_heads=1)
    student, _ = prune_model(source, spec, _batches())
    student.save_pretrained(tmp_path / "s")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float64).eval()
    assert loaded.config.head_dim == 8 and loaded.config.num_attention_heads == 2
    assert torch.allclose(_logits(loaded), _logits(student), atol=1e-10, rtol=0)


def test_bad_sizes_at_run_time_are_one_message() -> None:
    from kdcli.models import ModelError

    with pytest.raises(ModelError, match="hidden_size 64 is above the source's 32"):
        prune_model(_model(), PruneSpec(hidden_size=64), _batches())


def test_distill_a_pruned_student_end_to_end(tmp_path: Path, cli_runner) -> None:
    from transformers import AutoModelForCausalLM

    from kdcli.cli import app

    make_tiny_lm(tmp_path / "teacher", "llama", layers=4, hidden=32, heads=4, kv_heads=2)
    write_lm_rows(tmp_path / "train.jsonl", "text", 12)
    write_lm_rows(tmp_path / "eval.jsonl", "text", 4, seed=2)
    prune = {"num_hidden_layers": 3, "hidden_size": 24, "intermediate_size": 40, "num_attention_heads": 2, "rows": 8}
    recipe = {
        "task": "causal-lm",
        "teacher": {"model": "./teacher"},
        "student": {"prune": prune},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 32},
        "training": {
            "num_steps": 3,
            "batch_size": 4,
            "device": "cpu",
            "precision": "fp32",
            "log_every": 1,
            "save_dtype": "bf16",
        },
        "distillation": {"kd_loss_type": "forward_kl", "temperature": 2.0},
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    result = cli_runner.invoke(app, ["distill", str(path), "--json", "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    kept = summary["student_prune"]
    assert kept["sizes"]["hidden_size"] == 24 and len(kept["layers"]) == 3 and len(kept["hidden"]) == 24
    assert summary["steps"] == 3 and summary["eval"] is not None
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert student.config.hidden_size == 24 and student.config.head_dim == 8
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:  # training.save_dtype bf16
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert summary["student_parameters"] == sum(p.numel() for p in student.parameters())
