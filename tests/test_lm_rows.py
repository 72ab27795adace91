"""kdcli.tasks.lm_rows (causal-LM row encoding, the shift rule) and the causal-lm path of kdcli.data."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from kdcli.data import Collator, DataError, Source, prepare_data, prepare_from_recipe
from kdcli.tasks import IGNORE_INDEX
from kdcli.tasks.base import Columns
from kdcli.tasks.lm_rows import count_targets, encoder, next_token_labels, target_mask, truncate
from tiny import LM_ARCHS, make_tiny_lm, tiny_lm_tokenizer, write_lm_rows

X = IGNORE_INDEX
EOS, IM_START, IM_END, BOS = 0, 1, 2, 3


@pytest.fixture(scope="module")
def tok():
    return tiny_lm_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def encode(tok, rows: dict, row_format: str, max_length: int = 64, **columns) -> dict:
    return encoder(tok, Columns(row_format=row_format, **columns), max_length, "rows.jsonl")(rows)


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def prepare(tmp_path, tok, train, eval=None, **options):
    return prepare_data(
        Source(str(train), "jsonl"),
        Source(str(eval), "jsonl") if eval is not None else None,
        tok,
        task="causal-lm",
        cache_dir=str(tmp_path / "cache"),
        **options,
    )


# --- the shift rule -----------------------------------------------------------------------


def test_shift_rule_scores_position_t_against_token_t_plus_1():
    labels = torch.tensor([[X, X, 5, 6, 7], [X, 1, 2, X, X]])
    out = next_token_labels(labels)
    assert out.tolist() == [[X, 5, 6, 7, X], [1, 2, X, X, X]]
    assert out.shape == labels.shape


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
def test_shift_rule_keeps_dtype_and_device_and_returns_a_new_tensor(dtype):
    labels = torch.tensor([[1, 2, 3]], dtype=dtype)
    out = next_token_labels(labels)
    assert out.dtype == dtype and out.device == labels.device
    out[0, 0] = 99
    assert labels.tolist() == [[1, 2, 3]]
    assert next_token_labels(torch.tensor([[4]], dtype=dtype)).tolist() == [[X]]


def test_last_prompt_position_predicts_the_first_completion_token(tok):
    """prompt "A B", completion "C D": the shifted label at B (the last prompt token) is C."""
    row = encode(tok, {"prompt": ["A B"], "completion": ["C D"]}, "prompt-completion")
    a, space, b, c, d = 36, 224, 37, 38, 39
    assert row["input_ids"] == [[BOS, a, space, b, c, space, d, EOS]]
    assert row["labels"] == [[X, X, X, X, c, space, d, EOS]]
    shifted = next_token_labels(torch.tensor(row["labels"]))[0].tolist()
    assert shifted == [X, X, X, c, space, d, EOS, X]
    assert shifted[3] == c  # position of "B" predicts "C"
    assert row["n_targets"] == [4] and row["length"] == [8] and row["attention_mask"] == [[1] * 8]


# --- targets per row format ---------------------------------------------------------------


def test_text_rows_every_token_is_a_target_bos_first(tok):
    row = encode(tok, {"text": ["Hello there.", ""]}, "text")
    hello = ids(tok, "Hello there.")
    assert hello == [502, 437, 17]
    assert row["input_ids"] == [[BOS, *hello], [BOS]]
    assert row["labels"] == row["input_ids"]
    assert row["n_targets"] == [3, 0] and row["length"] == [4, 1]


def test_text_rows_without_bos_never_count_the_first_token(tmp_path):
    tok = tiny_lm_tokenizer(add_bos=False)
    row = encode(tok, {"text": ["Hello there."]}, "text")
    assert row["input_ids"] == [[502, 437, 17]] and row["n_targets"] == [2]


def test_text_column_is_the_one_configured(tok):
    row = encode(tok, {"body": ["Hi"]}, "text", text="body")
    assert row["input_ids"] == [[BOS, *ids(tok, "Hi")]]


def test_prompt_completion_targets_the_completion_and_eos(tok):
    rows = {"q": ["What is the cat?\n", "Hi"], "a": ["A dog.", ""]}
    out = encode(tok, rows, "prompt-completion", prompt="q", completion="a")
    p0, c0 = [BOS, *ids(tok, "What is the cat?\n")], ids(tok, "A dog.")
    assert out["input_ids"][0] == p0 + c0 + [EOS]
    assert out["labels"][0] == [X] * len(p0) + c0 + [EOS]
    # an empty completion still teaches the model to stop
    assert out["labels"][1] == [X, X, X, EOS] and out["n_targets"] == [len(c0) + 1, 1]


def test_prompt_completion_without_eos_token_adds_nothing(tok):
    class NoEos:
        eos_token_id = None

        def __call__(self, texts, add_special_tokens=True):
            return tok(texts, add_special_tokens=add_special_tokens)

    out = encoder(NoEos(), Columns(row_format="prompt-completion"), 64, "x")({"prompt": ["A B"], "completion": ["C"]})
    assert out["input_ids"] == [[BOS, 36, 224, 37, 38]] and out["labels"] == [[X, X, X, X, 38]]


def chatml(tok, role: str, content: str) -> tuple[list[int], list[int]]:
    """One ChatML turn's tokens: (header `<|im_start|>role\\n`, body `content<|im_end|>\\n`)."""
    return [IM_START, *ids(tok, f"{role}\n")], [*ids(tok, content), IM_END, *ids(tok, "\n")]


def test_messages_target_every_assistant_turn_and_its_end_marker_only(tok):
    turns = [
        ("system", "You are a helpful assistant."),
        ("user", "What is the cat?"),
        ("assistant", "A small dog."),
        ("user", "Why?"),
        ("assistant", "It is night."),
    ]
    row = encode(tok, {"messages": [[{"role": r, "content": c} for r, c in turns]]}, "messages")
    expected_ids, expected_labels = [], []
    for role, content in turns:
        head, body = chatml(tok, role, content)
        expected_ids += head + body
        expected_labels += [X] * len(head) + (body if role == "assistant" else [X] * len(body))
    assert row["input_ids"] == [expected_ids]
    assert row["labels"] == [expected_labels]
    targets = [i for i, label in zip(expected_ids, expected_labels, strict=True) if label != X]
    assert tok.decode(targets) == "A small dog.<|im_end|>\nIt is night.<|im_end|>\n"
    # the end-of-turn marker right after each assistant text is a target; the user's is not
    labels = row["labels"][0]
    im_ends = [k for k, i in enumerate(expected_ids) if i == IM_END]
    assert [labels[k] != X for k in im_ends] == [False, False, True, False, True]
    assert row["n_targets"] == [len(targets)]


def test_messages_keep_other_keys_and_drop_none_ones(tok):
    turns = [{"role": "user", "content": "Hi", "name": None}, {"role": "assistant", "content": "Yes.", "name": None}]
    row = encode(tok, {"messages": [turns]}, "messages")
    head, body = chatml(tok, "assistant", "Yes.")
    assert row["labels"][0][-len(body) :] == body
    assert row["labels"][0][: -len(body)] == [X] * (len(row["input_ids"][0]) - len(body))


def test_messages_without_assistant_turn_have_no_target(tok):
    row = encode(tok, {"messages": [[{"role": "user", "content": "Hi"}]]}, "messages")
    assert set(row["labels"][0]) == {X} and row["n_targets"] == [0]


def test_target_mask_needs_the_whole_token_inside_a_span():
    assert target_mask([(0, 2), (2, 5), (5, 7), (7, 7), (9, 9)], [(2, 7)]) == [False, True, True, False, False]
    assert target_mask([(0, 3), (3, 4)], [(2, 4)]) == [False, True]
    assert count_targets([5, 6, X, 7]) == 2 and count_targets([5]) == 0 and count_targets([]) == 0


# --- truncation -----------------------------------------------------------------------------


def test_truncate_keeps_the_prompt_end_and_the_completion_start():
    ids = list(range(16))  # 9 prompt tokens (0..8), 7 completion tokens (9..15)
    labels = [X] * 9 + ids[9:]
    # P=9, C=7, max 8: prompt_kept = min(9, max(1, 4)) = 4, completion_kept = 4
    assert truncate(ids, labels, 8) == ([5, 6, 7, 8, 9, 10, 11, 12], [X] * 4 + [9, 10, 11, 12])
    # short completion: all of it, the rest prompt (its end)
    assert truncate(ids[:11], labels[:11], 8) == ([3, 4, 5, 6, 7, 8, 9, 10], [X] * 6 + [9, 10])
    # short prompt: all of it, then the completion's start
    assert truncate([0, 1] + ids[9:], [X, X] + ids[9:], 5) == ([0, 1, 9, 10, 11], [X, X, 9, 10, 11])
    # fits: unchanged
    assert truncate(ids, labels, 16) == (ids, labels)
    # no target: the end of the "prompt"
    assert truncate([1, 2, 3], [X, X, X], 2) == ([2, 3], [X, X])


def test_prompt_completion_truncation_exact_tokens(tok):
    prompt, completion = "a b c d", "one two three"
    p, c = [BOS, *ids(tok, prompt)], [*ids(tok, completion), EOS]
    assert len(p) > 4 and len(c) > 4
    row = encode(tok, {"prompt": [prompt], "completion": [completion]}, "prompt-completion", max_length=8)
    assert row["input_ids"] == [p[-4:] + c[:4]]
    assert row["labels"] == [[X] * 4 + c[:4]]
    assert row["n_targets"] == [4]


def test_text_truncation_keeps_the_start(tok):
    text = "hello there what is the cat and the dog"
    full = [BOS, *ids(tok, text)]
    row = encode(tok, {"text": [text]}, "text", max_length=5)
    assert row["input_ids"] == [full[:5]] and row["labels"] == [full[:5]] and row["n_targets"] == [4]


def test_messages_truncation_keeps_the_prompt_end_and_the_answer_start(tok):
    turns = [{"role": "user", "content": "What is the cat and the dog?"}, {"role": "assistant", "content": "A dog."}]
    full = encode(tok, {"messages": [turns]}, "messages", max_length=1000)
    ids_, labels = full["input_ids"][0], full["labels"][0]
    first = next(k for k, label in enumerate(labels) if label != X)
    row = encode(tok, {"messages": [turns]}, "messages", max_length=10)
    # C = len - first >= 5 > max_length // 2, so half prompt end, half answer start
    kept = max(10 - (len(ids_) - first), 5)
    assert row["input_ids"] == [ids_[first - kept : first + 10 - kept]]
    assert row["labels"] == [labels[first - kept : first + 10 - kept]]


# --- prepare_data: the real datasets path ----------------------------------------------------


@pytest.mark.parametrize("row_format", ["text", "prompt-completion", "messages"])
def test_prepare_data_encodes_each_format_from_jsonl(tmp_path, tok, row_format):
    train = write_lm_rows(tmp_path / "train.jsonl", row_format, 12)
    dev = write_lm_rows(tmp_path / "dev.jsonl", row_format, 5, seed=1)
    data = prepare(tmp_path, tok, train, dev, row_format=row_format, text_column="text", max_length=256)
    assert data.labels is None and data.task == "causal-lm"
    assert data.dropped == {"train": 0, "eval": 0}
    assert len(data.train) == 12 and len(data.eval) == 5
    assert set(data.train.column_names) == {"input_ids", "attention_mask", "labels", "length", "n_targets"}
    raw = [json.loads(line) for line in train.read_text().splitlines()]
    for row, source in zip(data.train, raw, strict=True):
        assert all(label in (X, i) for i, label in zip(row["input_ids"], row["labels"], strict=True))
        assert row["n_targets"] == count_targets(row["labels"]) > 0 and row["length"] == len(row["input_ids"])
        text = tok.decode([label for label in row["labels"] if label != X])
        if row_format == "text":
            assert row["labels"] == row["input_ids"] and text == "<s>" + source["text"]
        elif row_format == "prompt-completion":
            assert text == source["completion"] + "<|endoftext|>"
        else:
            answers = [t["content"] for t in source["messages"] if t["role"] == "assistant"]
            assert text == "".join(a + "<|im_end|>\n" for a in answers)
    batch = Collator.for_tokenizer(tok).batch(data.train, range(4))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    width = max(data.train_lengths[:4])
    assert batch["labels"].shape == (4, width) and batch["input_ids"].shape == (4, width)
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == X).all() and (batch["input_ids"][pad] == EOS).all()


def test_rows_without_target_are_dropped_and_counted(tmp_path, tok):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "Hello there."}, {"text": ""}, {"text": "Hi"}, {"text": ""}])
    dev = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": "Yes."}])
    data = prepare(tmp_path, tok, train, dev, text_column="text")
    assert data.dropped == {"train": 2, "eval": 1}
    assert len(data.train) == 2 and len(data.eval) == 1
    assert data.train["input_ids"] == [[BOS, *ids(tok, "Hello there.")], [BOS, *ids(tok, "Hi")]]


def test_max_samples_apply_before_dropping(tmp_path, tok):
    rows = [{"text": ""}, {"text": "Hi"}, {"text": ""}, {"text": "Hello there."}]
    data = prepare(tmp_path, tok, write_jsonl(tmp_path / "t.jsonl", rows), text_column="text", max_train_samples=2)
    assert data.dropped == {"train": 1} and data.train["input_ids"] == [[BOS, *ids(tok, "Hi")]]


def test_a_split_with_no_target_left_is_an_error(tmp_path, tok):
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "A B", "completion": "C"}] * 3)
    with pytest.raises(DataError, match=r"t\.jsonl: no row has a target token left.*Fix: .*max_length"):
        prepare(tmp_path, tok, train, row_format="prompt-completion", max_length=1)


def test_messages_row_without_assistant_is_dropped(tmp_path, tok):
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]},
    ]
    data = prepare(tmp_path, tok, write_jsonl(tmp_path / "m.jsonl", rows), row_format="messages")
    assert data.dropped == {"train": 1} and len(data.train) == 1


def test_prepare_from_recipe_passes_row_format_and_columns(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"q": "A B", "a": "C D"}, {"q": "Hi", "a": "Yes."}])
    data_section = SimpleNamespace(
        train=SimpleNamespace(path=str(path), format="jsonl", split=None, config=None, delimiter=None),
        eval=None,
        text_column="sentence",
        text_pair_column=None,
        label_column="label",
        max_length=32,
        max_train_samples=None,
        max_eval_samples=None,
        row_format="prompt-completion",
        prompt_column="q",
        completion_column="a",
        messages_column="messages",
    )
    recipe = SimpleNamespace(task="causal-lm", data=data_section)
    data = prepare_from_recipe(recipe, tok, cache_dir=str(tmp_path / "cache"))
    assert data.labels is None and data.dropped == {"train": 0}
    assert data.train["labels"][0] == [X, X, X, X, 38, 224, 39, EOS]


# --- errors -------------------------------------------------------------------------------


def test_missing_column_names_the_option_and_the_columns(tmp_path, tok):
    train = write_lm_rows(tmp_path / "t.jsonl", "prompt-completion", 3)
    with pytest.raises(DataError, match=r"t\.jsonl: no column 'answer' \(data\.completion_column\).*'prompt'.*Fix"):
        prepare(tmp_path, tok, train, row_format="prompt-completion", completion_column="answer")
    with pytest.raises(DataError, match=r"no column 'sentence' \(data\.text_column\).*Fix: set data\.text_column"):
        prepare(tmp_path, tok, write_lm_rows(tmp_path / "x.jsonl", "text", 3), text_column="sentence")
    # the encoder on its own says the same
    with pytest.raises(DataError, match=r"rows\.jsonl: no column 'messages' \(data\.messages_column\)"):
        encode(tok, {"text": ["Hi"]}, "messages")


def test_none_cell_names_source_column_and_row(tmp_path, tok):
    rows = [{"prompt": "A", "completion": "B"}] * 3 + [{"prompt": "A", "completion": None}]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError, match=r"t\.jsonl, column 'completion', row 4: the cell is empty.*Fix"):
        prepare(tmp_path, tok, train, row_format="prompt-completion")
    with pytest.raises(DataError, match=r"rows\.jsonl, column 'text', row 2: the cell is empty"):
        encode(tok, {"text": ["Hi", None]}, "text")
    with pytest.raises(DataError, match=r"column 'text', row 1: expected text, got a int.*Fix"):
        encode(tok, {"text": [3]}, "text")


@pytest.mark.parametrize(
    ("cell", "problem"),
    [
        (None, "the cell is empty"),
        ("Hi", "expected a list of chat turns, got a str"),
        ([], "expected a list of chat turns, got an empty list"),
        (["Hi"], "turn 1 is a str, not a role/content object"),
        ([{"role": "user"}], "turn 1 has no string 'content' \\(missing\\)"),
        ([{"role": "user", "content": "Hi"}, {"role": 2, "content": "x"}], "turn 2 has no string 'role' \\(a int\\)"),
        ([{"role": "assistant", "content": "Hi"}], "the first turn is an assistant turn"),
    ],
)
def test_malformed_messages_name_the_row(tok, cell, problem):
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]
    with pytest.raises(DataError, match=rf"rows\.jsonl, column 'messages', row 2: {problem}.*Fix"):
        encode(tok, {"messages": [good, cell]}, "messages")


def test_malformed_messages_in_a_file_name_the_file_row(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]}] * 2
    rows.append({"messages": [{"role": "user", "content": None}]})
    with pytest.raises(DataError, match=r"m\.jsonl, column 'messages', row 3: turn 1 has no string 'content'"):
        prepare(tmp_path, tok, write_jsonl(tmp_path / "m.jsonl", rows), row_format="messages")


def test_messages_need_a_chat_template(tmp_path, tok):
    bare = tiny_lm_tokenizer(chat_template=None)
    with pytest.raises(DataError, match="has none. Fix: use a tokenizer with a chat template, or row_format prompt-co"):
        encoder(bare, Columns(row_format="messages"), 32, "m.jsonl")
    train = write_lm_rows(tmp_path / "m.jsonl", "messages", 2)
    with pytest.raises(DataError, match=r"m\.jsonl: row_format messages needs the tokenizer's chat template"):
        prepare(tmp_path, bare, train, row_format="messages")


def test_messages_need_a_fast_tokenizer():
    slow = SimpleNamespace(chat_template="{{ x }}", is_fast=False, eos_token_id=0)
    with pytest.raises(DataError, match="needs a fast tokenizer.*Fix: use a tokenizer with a tokenizer.json"):
        encoder(slow, Columns(row_format="messages"), 32, "m.jsonl")


def test_chat_template_that_does_not_render_prefixes_is_refused(tok):
    odd = tiny_lm_tokenizer(chat_template="{{ messages | length }}" + tok.chat_template)
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]
    with pytest.raises(DataError, match="row 1: the chat template does not render turns as prefixes.*Fix"):
        encode(odd, {"messages": [turns]}, "messages")


def test_chat_template_raising_names_the_row(tok):
    strict = tiny_lm_tokenizer(
        chat_template="{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
        + tok.chat_template
    )
    turns = [{"role": "system", "content": "Hi"}, {"role": "user", "content": "Hi"}]
    with pytest.raises(DataError, match=r"column 'messages', row 1: the chat template refused.*no system turns.*Fix"):
        encode(strict, {"messages": [turns + [{"role": "assistant", "content": "Yes."}]]}, "messages")


def test_text_rows_from_tsv(tmp_path, tok):
    path = tmp_path / "t.tsv"
    path.write_text("text\tlabel\nHello there.\tx\n\tx\nHi\tx\n", encoding="utf-8")
    data = prepare_data(
        Source(str(path), "tsv"), None, tok, task="causal-lm", text_column="text", cache_dir=str(tmp_path)
    )
    assert data.dropped == {"train": 1} and data.train["n_targets"] == [3, 2]


def test_unknown_row_format(tok):
    with pytest.raises(DataError, match="unknown data.row_format 'chat'. Fix: use one of text, prompt-completion"):
        encoder(tok, Columns(row_format="chat"), 32, "x")


# --- tiny causal LMs ------------------------------------------------------------------------


def test_tiny_lm_tokenizer_is_deterministic(tok):
    again = tiny_lm_tokenizer()
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert len(tok) == 512 and (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (EOS, EOS, BOS)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [IM_START, IM_END]


@pytest.mark.parametrize("arch", LM_ARCHS)
def test_make_tiny_lm_round_trips_through_from_pretrained(tmp_path, tok, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vocab = 520 if arch == "gpt2" else 512  # a table wider than the tokenizer, as padded ones are
    folder = make_tiny_lm(tmp_path / arch, arch, layers=2, vocab=vocab)
    model = AutoModelForCausalLM.from_pretrained(folder)
    loaded = AutoTokenizer.from_pretrained(folder)
    assert loaded("Hello there.")["input_ids"] == tok("Hello there.")["input_ids"]
    assert loaded.chat_template == tok.chat_template and loaded.eos_token_id == EOS
    assert model.config.model_type == arch and model.config.tie_word_embeddings
    batch = loaded(["Hello there.", "What is the cat?"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], vocab)
    again = AutoModelForCausalLM.from_pretrained(make_tiny_lm(tmp_path / "again", arch, layers=2, vocab=vocab))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
