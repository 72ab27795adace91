"""kdcli.features: hooks on exactly the matched layers; pre-softmax scores under SDPA."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from kdcli.features import (
    MASK_VALUE,
    FeatureCapture,
    FeatureError,
    Features,
    attention_scores,
    model_inputs,
)
from kdcli.models import encoder_blocks, load_model, load_tokenizer
from tiny import ARCHS, MINILM_DIR, make_tiny_model

SEQ = "sequence-classification"


def padded_batch(vocab: int = 150, seed: int = 0) -> dict[str, torch.Tensor]:
    """Three rows of 9, 6 and 3 tokens padded to 9, with a second segment in row 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[0, 5:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": torch.tensor([0, 1, 0])}


def eager_reference(path, batch, model):
    """The same checkpoint with eager attention, asked for every attention map and hidden state."""
    eager = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return eager(**model_inputs(model, batch), output_attentions=True, output_hidden_states=True)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch, layers=3, hidden=32, heads=4) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_scores_softmax_to_eager_attentions_and_hidden_match(tiny_dirs, arch):
    path = tiny_dirs[arch]
    model = load_model(str(path), SEQ).model
    batch = padded_batch()
    with FeatureCapture(model, hidden_layers={0, 2, 3}, attention_layers={1, 3}) as capture:
        feats = capture.run_teacher(batch)
    ref = eager_reference(path, batch, model)
    assert set(feats.scores) == {1, 3} and set(feats.hidden) == {0, 2, 3}
    for block in (1, 3):
        assert feats.scores[block].shape == (3, 4, 9, 9)
        torch.testing.assert_close(feats.scores[block].softmax(-1), ref.attentions[block - 1], atol=1e-5, rtol=0)
    for layer in (0, 2, 3):
        torch.testing.assert_close(feats.hidden[layer], ref.hidden_states[layer], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats.logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(feats.mask, batch["attention_mask"])


def test_minilm_scores_match_eager_attentions():
    tokenizer = load_tokenizer(str(MINILM_DIR))
    batch = dict(
        tokenizer(["a gripping , funny and moving film", "dull"], ["yes", "no"], padding=True, return_tensors="pt")
    )
    assert (batch["attention_mask"] == 0).any()
    model = load_model(str(MINILM_DIR), SEQ, num_labels=2).model
    with FeatureCapture(model, hidden_layers={3}, attention_layers={1, 6}) as capture:
        feats = capture.run_teacher(batch)
    eager = AutoModelForSequenceClassification.from_pretrained(
        str(MINILM_DIR), attn_implementation="eager", num_labels=2
    ).eval()
    with torch.no_grad():
        ref = eager(**batch, output_attentions=True, output_hidden_states=True)
    for block in (1, 6):
        assert feats.scores[block].shape[1] == 12
        torch.testing.assert_close(feats.scores[block].softmax(-1), ref.attentions[block - 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.hidden[3], ref.hidden_states[3], atol=1e-5, rtol=1e-5)


def test_scores_are_pre_softmax_with_the_additive_minus_10000_mask(tiny_dirs):
    model = load_model(str(tiny_dirs["bert"]), SEQ).model
    batch = padded_batch()
    attention = encoder_blocks(model).modules[1].attention.self
    with torch.no_grad():
        hidden_in = {}
        handle = (
            encoder_blocks(model)
            .modules[1]
            .register_forward_pre_hook(lambda m, args: hidden_in.setdefault("x", args[0]))
        )
        with FeatureCapture(model, attention_layers={2}) as capture:
            feats = capture.run(batch)
        handle.remove()
        x = hidden_in["x"]
        q = attention.query(x).view(3, 9, 4, 8).transpose(1, 2)
        k = attention.key(x).view(3, 9, 4, 8).transpose(1, 2)
        raw = q @ k.transpose(-1, -2) / math.sqrt(8)
    expected = raw + (1 - batch["attention_mask"].float())[:, None, None, :] * -10000.0
    torch.testing.assert_close(feats.scores[2], expected)
    # a padded key column sits 10000 below its unmasked value; a real one is untouched
    assert torch.allclose(feats.scores[2][2, :, :, 5] - raw[2, :, :, 5], torch.tensor(MASK_VALUE))
    assert torch.equal(feats.scores[2][0], expected[0]) and torch.allclose(feats.scores[2][0], raw[0])


def test_attention_scores_function():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    scores = attention_scores(q, k, mask, num_heads=3)
    assert scores.shape == (2, 3, 5, 5)
    qh = q.view(2, 5, 3, 2)[:, :, 1]  # head 1
    kh = k.view(2, 5, 3, 2)[:, :, 1]
    torch.testing.assert_close(scores[0, 1], qh[0] @ kh[0].T / math.sqrt(2))
    torch.testing.assert_close(scores[1, 1, :, 3], (qh[1] @ kh[1].T / math.sqrt(2))[:, 3] - 10000.0)
    torch.testing.assert_close(attention_scores(q, k, None, 3)[0], scores[0])


def test_the_model_keeps_sdpa_and_gets_no_output_flags(tiny_dirs, monkeypatch):
    model = load_model(str(tiny_dirs["bert"]), SEQ).model
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    seen = {}
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with FeatureCapture(model, hidden_layers={1}, attention_layers={1, 2, 3}) as capture:
        capture.run(padded_batch())
    assert model.config._attn_implementation == "sdpa"
    assert len(calls) == 3  # every block still ran the SDPA kernel
    assert set(seen) == {"input_ids", "attention_mask", "token_type_ids"}  # no output_* flags, no labels


def test_hooks_only_on_matched_layers_and_removed_on_close(tiny_dirs):
    model = load_model(str(tiny_dirs["bert"]), SEQ).model
    blocks = encoder_blocks(model).modules
    capture = FeatureCapture(model, hidden_layers={0, 2}, attention_layers={3})
    assert len(blocks[0]._forward_pre_hooks) == 1  # layer 0 = input of block 1
    assert [len(b._forward_hooks) for b in blocks] == [0, 1, 0]
    assert len(blocks[2].attention.self.query._forward_hooks) == 1
    assert len(blocks[0].attention.self.query._forward_hooks) == 0
    capture.close()
    assert not blocks[0]._forward_pre_hooks and not any(b._forward_hooks for b in blocks)
    assert not blocks[2].attention.self.query._forward_hooks


def test_plain_forwards_are_not_recorded(tiny_dirs):
    """Hooks record only inside run(): an eval forward between runs changes nothing."""
    model = load_model(str(tiny_dirs["bert"]), SEQ).model
    batch = padded_batch()
    with FeatureCapture(model, hidden_layers={1}, attention_layers={1}) as capture:
        first = capture.run_teacher(batch)
        with torch.no_grad():
            model(input_ids=torch.tensor([[2, 7, 3]]))
        second = capture.run_teacher(batch)
    assert torch.equal(first.hidden[1], second.hidden[1]) and torch.equal(first.scores[1], second.scores[1])


def test_teacher_features_are_usable_by_autograd(tiny_dirs):
    teacher = load_model(str(tiny_dirs["bert"]), SEQ).model
    teacher.train()
    student = load_model(str(tiny_dirs["bert"]), SEQ).model.train()
    batch = padded_batch()
    with FeatureCapture(teacher, attention_layers={1}) as t_cap, FeatureCapture(student, attention_layers={1}) as s_cap:
        with torch.inference_mode():
            raw = t_cap.run(batch)
        feats_T = t_cap.run_teacher(batch)
        feats_S = s_cap.run(batch)
    assert not teacher.training  # run_teacher puts the teacher in eval mode
    assert raw.logits.is_inference() and not feats_T.logits.is_inference()
    assert not feats_T.logits.requires_grad
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        feats_S.scores[1] * raw.scores[1]  # why run_teacher detaches
    loss = -(feats_T.logits.softmax(-1) * feats_S.logits.log_softmax(-1)).sum()
    loss = loss + (feats_S.scores[1] - feats_T.scores[1]).pow(2).mean()
    loss.backward()
    query = encoder_blocks(student).modules[0].attention.self.query.weight
    assert query.grad is not None and query.grad.abs().sum() > 0


def test_detached_copies_only_captured_tensors():
    with torch.inference_mode():
        feats = Features(logits=torch.ones(2, 3), hidden={1: torch.ones(2, 4, 5)}, mask=torch.ones(2, 4))
    copy = feats.detached()
    assert set(copy.hidden) == {1} and copy.scores == {}
    assert not any(t.is_inference() for t in (copy.logits, copy.hidden[1], copy.mask))


@pytest.mark.parametrize("arch", ["distilbert", "roberta"])
def test_inputs_the_model_does_not_take_are_dropped(tiny_dirs, arch):
    """DistilBERT has no token_type_ids; RoBERTa has a single token type (a BERT tokenizer's
    pair ids of 1 would index out of range)."""
    model = load_model(str(tiny_dirs[arch]), SEQ).model
    batch = padded_batch()
    assert set(model_inputs(model, batch)) == {"input_ids", "attention_mask"}
    with FeatureCapture(model, hidden_layers={1}) as capture:
        assert capture.run(batch).logits.shape == (3, 2)


def test_forward_argument_calls_the_wrapper(tiny_dirs):
    model = load_model(str(tiny_dirs["bert"]), SEQ).model
    called = []

    def wrapper(**inputs):
        called.append(sorted(inputs))
        return model(**inputs)

    with FeatureCapture(model, hidden_layers={2}) as capture:
        feats = capture.run(padded_batch(), forward=wrapper)
    assert called == [["attention_mask", "input_ids", "token_type_ids"]] and 2 in feats.hidden


def test_token_classification_logits(tmp_path):
    path = make_tiny_model(tmp_path, task="token-classification", num_labels=5)
    model = load_model(str(path), "token-classification").model
    with FeatureCapture(model, attention_layers={2}) as capture:
        feats = capture.run(padded_batch())
    assert feats.logits.shape == (3, 9, 5) and feats.scores[2].shape == (3, 2, 9, 9)


def test_layer_numbers_are_checked(tiny_dirs):
    model = load_model(str(tiny_dirs["bert"]), SEQ).model
    with pytest.raises(FeatureError, match=r"student has hidden layers 0..3 .*layer 4.*Fix"):
        FeatureCapture(model, hidden_layers={4}, role="student")
    with pytest.raises(FeatureError, match=r"attention layers 1..3 .*layer 0"):
        FeatureCapture(model, attention_layers={0})
    assert FeatureCapture(model, hidden_layers={3}, attention_layers={3}).hidden_layers == (3,)


def test_other_architectures_capture_hidden_states_but_refuse_attention():
    config = AutoConfig.for_model(
        "deberta-v2",
        vocab_size=150,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    batch = padded_batch()
    with FeatureCapture(model, hidden_layers={0, 1, 2}) as capture:
        feats = capture.run(batch)
    with torch.no_grad():
        ref = model(**model_inputs(model, batch), output_hidden_states=True)
    for layer in (0, 1, 2):
        torch.testing.assert_close(feats.hidden[layer], ref.hidden_states[layer])
    with pytest.raises(
        FeatureError, match=r"teacher is a 'deberta-v2' model: attention features .*bert.*distilbert.*Fix"
    ):
        FeatureCapture(model, attention_layers={1}, role="teacher")


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_table_names_the_blocks_and_projections(tiny_dirs, arch):
    from kdcli.facts.architectures import architecture, attention_capture_supported

    model = load_model(str(tiny_dirs[arch]), SEQ).model
    row = architecture(model.config.model_type)
    assert attention_capture_supported(model.config.model_type)
    blocks = encoder_blocks(model)
    assert blocks.path == row.blocks
    assert isinstance(blocks.modules[0].get_submodule(row.query), torch.nn.Linear)
    assert isinstance(blocks.modules[0].get_submodule(row.key), torch.nn.Linear)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_decoders_capture_hidden_states_before_the_final_norm(model_type):
    from kdcli.facts.architectures import architecture, attention_capture_supported

    sizes = {
        "vocab_size": 150,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "num_key_value_heads": 2,
        "pad_token_id": 0,
    }
    if model_type == "gpt2":
        sizes = {"vocab_size": 150, "n_embd": 32, "n_layer": 2, "n_head": 2, "pad_token_id": 0}
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(model_type, **sizes)).eval()
    row = architecture(model_type)
    assert not attention_capture_supported(model_type) and row.needs_pad_token
    assert encoder_blocks(model).path == row.blocks
    batch = {"input_ids": padded_batch()["input_ids"], "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    with FeatureCapture(model, hidden_layers={1, 2}) as capture:
        feats = capture.run(batch)
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True)
    torch.testing.assert_close(feats.hidden[1], ref.hidden_states[1])
    # hidden_states[N] is the final norm's output; hidden layer N is its input
    torch.testing.assert_close(model.get_submodule(row.final_norm)(feats.hidden[2]), ref.hidden_states[2])
    with pytest.raises(FeatureError, match=r"attention features .*Fix"):
        FeatureCapture(model, attention_layers={1})
