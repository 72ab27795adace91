"""kdcli.data: reading, labels, tokenisation, batch order and padding."""

from __future__ import annotations

import json

import pytest
import torch

from kdcli.data import (
    Collator,
    DataError,
    Labels,
    Source,
    eval_batches,
    infer_labels,
    load_table,
    prepare_data,
    prepare_from_recipe,
    train_batches,
)
from kdcli.models import load_tokenizer
from kdcli.tasks import IGNORE_INDEX
from tiny import NER_TAGS, make_tiny_bert, read_tsv, write_sst2_sample, write_tiny_ner


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(str(make_tiny_bert(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
    return write_sst2_sample(tmp_path_factory.mktemp("sst2"), n_train=40, n_eval=12)


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def _prepare(train, eval, tokenizer, cache, **options):
    options.setdefault("text_column", "sentence")
    options.setdefault("label_column", "label")
    return prepare_data(train, eval, tokenizer, cache_dir=cache, **options)


# --- reading ----------------------------------------------------------------------------


def test_tsv_is_read_without_quoting_or_na_guessing(tmp_path, cache):
    path = tmp_path / "t.tsv"
    path.write_text('label\tsentence\n1\t"quoted" start\n0\tnull\n1\tNA\n0\t\n', encoding="utf-8")
    table = load_table(Source(str(path), "tsv"), cache_dir=cache)
    assert table["sentence"] == ['"quoted" start', "null", "NA", ""]
    assert table["label"] == ["1", "0", "1", "0"]


def test_real_sst2_rows_are_read_exactly(sst2, cache):
    train, _ = sst2
    table = load_table(Source(str(train), "tsv"), cache_dir=cache)
    rows = read_tsv(train)
    assert len(table) == 40
    assert table["sentence"] == [r["sentence"] for r in rows]


def test_csv_json_jsonl_and_parquet_give_the_same_rows(tmp_path, cache):
    rows = [{"text": "good , film", "label": "pos"}, {"text": 'say "hi"', "label": "neg"}]
    (tmp_path / "d.csv").write_text('text,label\n"good , film",pos\n"say ""hi""",neg\n', encoding="utf-8")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for fmt, name in [("csv", "d.csv"), ("jsonl", "d.jsonl"), ("json", "d.json"), ("parquet", "d.parquet")]:
        table = load_table(Source(str(tmp_path / name), fmt), cache_dir=cache)
        assert table.to_list() == rows, fmt


def test_semicolon_delimiter(tmp_path, cache):
    (tmp_path / "d.csv").write_text("text;label\na;1\n", encoding="utf-8")
    assert load_table(Source(str(tmp_path / "d.csv"), "csv", delimiter=";"), cache_dir=cache).to_list() == [
        {"text": "a", "label": "1"}
    ]


def test_read_errors_name_the_file_and_the_fix(tmp_path, cache, monkeypatch):
    with pytest.raises(DataError, match=r"nope.tsv: no such file. Fix"):
        load_table(Source(str(tmp_path / "nope.tsv"), "tsv"))
    (tmp_path / "empty.tsv").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="the file is empty"):
        load_table(Source(str(tmp_path / "empty.tsv"), "tsv"))
    (tmp_path / "header.tsv").write_text("label\tsentence\n", encoding="utf-8")
    with pytest.raises(DataError, match="a header line but no rows"):
        load_table(Source(str(tmp_path / "header.tsv"), "tsv"), cache_dir=cache)
    with pytest.raises(DataError, match="unknown format 'xlsx'"):
        load_table(Source(str(tmp_path / "header.tsv"), "xlsx"))
    (tmp_path / "bad.jsonl").write_text("{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl: cannot read it"):
        load_table(Source(str(tmp_path / "bad.jsonl"), "jsonl"), cache_dir=cache)
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"hub dataset 'nobody/no-data' \(split validation\): cannot read it"):
        load_table(Source("nobody/no-data", None, split="validation"), cache_dir=cache)


# --- labels -----------------------------------------------------------------------------


def test_integer_labels_keep_their_values():
    labels = infer_labels(["0", "2", 1, 2.0])
    assert labels == Labels("int", ("0", "1", "2"))
    assert [labels.encode(v) for v in ("2", 0, 1.0)] == [2, 0, 1]
    with pytest.raises(DataError, match="label 3 is not one of 0..2"):
        labels.encode(3)


def test_string_labels_get_sorted_ids():
    labels = infer_labels(["pos", "neg", "neutral", "pos"])
    assert labels.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert labels.label2id["pos"] == 2 and labels.encode("neutral") == 1
    assert infer_labels([["O", "B-X"], ["I-X"]]).names == ("B-X", "I-X", "O")  # tag lists flattened
    with pytest.raises(DataError, match="'other' is not one of"):
        labels.encode("other")


def test_class_label_names_win_and_bad_labels_are_refused():
    assert infer_labels([0, 1], names=["negative", "positive"]).id2label == {0: "negative", 1: "positive"}
    with pytest.raises(DataError, match="label -1 is negative"):
        infer_labels([0, 1, -1])
    with pytest.raises(DataError, match="some rows have no label"):
        infer_labels([0, None])
    with pytest.raises(DataError, match="got a float"):
        infer_labels([0.5, 1.0])


def test_labels_are_counted_over_both_splits_with_one_rule(tmp_path, tokenizer, cache):
    """ "1" and "1.0" are one class; names in train with ids in eval, or an empty label, are
    refused naming the file and the row (they would silently change the head)."""
    train, dev = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    train.write_text("label\tsentence\n1\ta good film\n0\ta bad film\n", encoding="utf-8")
    dev.write_text("label\tsentence\n1.0\tgood\n0\tbad\n", encoding="utf-8")
    data = _prepare(Source(str(train), "tsv"), Source(str(dev), "tsv"), tokenizer, cache)
    assert data.labels.num_labels == 2 and data.eval["labels"] == [1, 0]
    train.write_text("label\tsentence\npos\ta good film\nneg\ta bad film\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dev.tsv, column 'label', row 1: labels mix class ids and names"):
        _prepare(Source(str(train), "tsv"), Source(str(dev), "tsv"), tokenizer, cache)
    train.write_text("label\tsentence\n1\ta good film\n\ta film\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train.tsv, column 'label', row 2: some rows have no label"):
        _prepare(Source(str(train), "tsv"), None, tokenizer, cache)


@pytest.mark.parametrize(
    "text, words",
    [
        ('label,sentence\n0,ok\n1,"a fine film\n0,a dull one"\n1,fine\n', "line 3: a quote opened on line 3"),
        ("label,sentence\n0,ok\n1,a,b\n", "line 3: 3 fields but the header has 2"),
    ],
)
def test_ambiguous_csv_is_refused_before_datasets_reads_it(tmp_path, tokenizer, cache, text, words):
    path = tmp_path / "d.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=f"d.csv, {words}.*Fix"):
        _prepare(Source(str(path), "csv"), None, tokenizer, cache)


# --- tokenising -------------------------------------------------------------------------


def test_sst2_sample_tokenised_once_with_int_labels(sst2, tokenizer, cache):
    train, dev = sst2
    data = _prepare(Source(str(train), "tsv"), Source(str(dev), "tsv"), tokenizer, cache, max_length=24)
    rows = read_tsv(train)
    assert data.labels.num_labels == 2 and data.labels.id2label == {0: "0", 1: "1"}
    assert data.train["labels"] == [int(r["label"]) for r in rows]
    assert len(data.eval) == 12
    expected = tokenizer(rows[3]["sentence"], truncation=True, max_length=24)
    assert data.train[3]["input_ids"] == expected["input_ids"]
    assert data.train[3]["token_type_ids"] == expected["token_type_ids"]
    assert max(data.train_lengths) <= 24 and data.train_lengths[3] == len(expected["input_ids"])
    again = _prepare(Source(str(train), "tsv"), Source(str(dev), "tsv"), tokenizer, cache, max_length=24)
    assert again.train.cache_files == data.train.cache_files  # map ran once, then came from the cache


def test_max_samples_take_the_first_rows_and_keep_the_label_set(sst2, tokenizer, cache):
    train, dev = sst2
    data = _prepare(
        Source(str(train), "tsv"), Source(str(dev), "tsv"), tokenizer, cache, max_train_samples=3, max_eval_samples=2
    )
    rows = read_tsv(train)
    assert len(data.train) == 3 and len(data.eval) == 2
    assert data.train["labels"] == [int(r["label"]) for r in rows[:3]]
    assert data.labels.num_labels == 2  # from the full columns, even if 3 rows had one class


def test_string_labels_and_text_pairs(tmp_path, tokenizer, cache):
    (tmp_path / "train.jsonl").write_text(
        "".join(
            json.dumps({"a": f"the film {i}", "b": "is good", "y": y}) + "\n"
            for i, y in enumerate(["pos", "neg", "pos"])
        ),
        encoding="utf-8",
    )
    (tmp_path / "eval.jsonl").write_text(json.dumps({"a": "a", "b": "b", "y": "mixed"}) + "\n", encoding="utf-8")
    data = prepare_data(
        Source(str(tmp_path / "train.jsonl"), "jsonl"),
        Source(str(tmp_path / "eval.jsonl"), "jsonl"),
        tokenizer,
        text_column="a",
        text_pair_column="b",
        label_column="y",
        cache_dir=cache,
    )
    assert data.labels.id2label == {0: "mixed", 1: "neg", 2: "pos"}
    assert data.train["labels"] == [2, 1, 2] and data.eval["labels"] == [0]
    row = data.train[0]
    assert row["input_ids"] == tokenizer("the film 0", "is good")["input_ids"]
    assert 1 in row["token_type_ids"]


def test_a_missing_column_is_named_with_the_ones_there(sst2, tokenizer, cache):
    train, _ = sst2
    with pytest.raises(
        DataError, match=r"train.tsv: no column 'text' \(data.text_column\); it has \['label', 'sentence'\]"
    ):
        prepare_data(Source(str(train), "tsv"), None, tokenizer, text_column="text", cache_dir=cache)
    with pytest.raises(DataError, match=r"no column 'gold' \(data.label_column\)"):
        prepare_data(
            Source(str(train), "tsv"), None, tokenizer, text_column="sentence", label_column="gold", cache_dir=cache
        )


@pytest.mark.parametrize("int_tags", [False, True])
def test_token_classification_labels_the_first_sub_token(tmp_path, tokenizer, cache, int_tags):
    path = write_tiny_ner(tmp_path / "ner.jsonl", n=4, int_tags=int_tags)
    data = prepare_data(
        Source(str(path), "jsonl"),
        None,
        tokenizer,
        task="token-classification",
        text_column="tokens",
        label_column="ner_tags",
        cache_dir=cache,
    )
    names = sorted(NER_TAGS) if not int_tags else [str(i) for i in range(len(NER_TAGS))]
    assert list(data.labels.names) == names
    words, tags = ["mary", "jane", "went", "to", "paris"], ["B-PER", "I-PER", "O", "O", "B-LOC"]
    row = data.train[1]
    enc = tokenizer(words, is_split_into_words=True)
    assert row["input_ids"] == enc["input_ids"]
    expected, previous = [], None
    for word in enc.word_ids():
        if word is None or word == previous:
            expected.append(IGNORE_INDEX)
        else:
            expected.append(data.labels.encode(tags[word] if not int_tags else NER_TAGS.index(tags[word])))
        previous = word
    assert row["labels"] == expected
    assert sum(x != IGNORE_INDEX for x in row["labels"]) == 5 and row["labels"][0] == IGNORE_INDEX


def test_token_classification_rows_must_have_one_tag_per_word(tmp_path, tokenizer, cache):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"tokens": ["a", "b"], "ner_tags": ["O"]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="a row has 2 words but 1 tags"):
        prepare_data(
            Source(str(path), "jsonl"),
            None,
            tokenizer,
            task="token-classification",
            text_column="tokens",
            label_column="ner_tags",
            cache_dir=cache,
        )


# --- batch order ------------------------------------------------------------------------


def test_batches_are_a_deterministic_permutation_per_epoch():
    lengths = list(range(23))
    first = train_batches(lengths, 5, seed=7, epoch=0)
    assert first == train_batches(lengths, 5, seed=7, epoch=0)
    assert [len(b) for b in first] == [5, 5, 5, 5, 3]
    assert sorted(i for b in first for i in b) == lengths
    assert first != train_batches(lengths, 5, seed=7, epoch=1)
    assert first != train_batches(lengths, 5, seed=8, epoch=0)
    assert first[2:] == train_batches(lengths, 5, seed=7, epoch=0)[2:]  # resume = skip a count


@pytest.mark.parametrize("n", [20, 23])
def test_ranks_get_what_distributed_sampler_gives_them(n):
    from torch.utils.data import DistributedSampler

    lengths = [1] * n
    for rank in range(2):
        sampler = DistributedSampler(range(n), num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(4)
        mine = train_batches(lengths, 4, seed=3, epoch=4, rank=rank, world_size=2)
        assert [i for b in mine for i in b] == list(sampler)
        assert all(len(b) <= 4 for b in mine)


def test_two_ranks_see_the_global_batches_of_one_process():
    lengths = [3] * 40
    single = train_batches(lengths, 8, seed=1, epoch=0)
    ranks = [train_batches(lengths, 4, seed=1, epoch=0, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, batch in enumerate(single):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(batch)


def test_group_by_length_cuts_padding_and_keeps_batch_order_random():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (2000,), generator=g).tolist()
    plain = train_batches(lengths, 8, seed=0, epoch=0)
    grouped = train_batches(lengths, 8, seed=0, epoch=0, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(2000))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(plain) / 4
    longest = [max(lengths[i] for i in b) for b in grouped]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    assert grouped == train_batches(lengths, 8, seed=0, epoch=0, group_by_length=True)
    assert grouped != train_batches(lengths, 8, seed=0, epoch=1, group_by_length=True)
    ranks = [train_batches(lengths, 4, seed=0, epoch=0, group_by_length=True, rank=r, world_size=2) for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*ranks)] == [sorted(b) for b in grouped]


def test_batch_arguments_are_checked():
    with pytest.raises(ValueError):
        train_batches([1, 2], 0, seed=0, epoch=0)
    with pytest.raises(ValueError):
        train_batches([1, 2], 2, seed=0, epoch=0, rank=2, world_size=2)
    assert train_batches([], 2, seed=0, epoch=0) == []


def test_eval_batches_cover_every_row_once():
    assert eval_batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert eval_batches(7, 3, rank=1, world_size=2) == [[3, 4, 5]]


# --- padding ----------------------------------------------------------------------------


def test_collator_pads_each_batch_to_its_longest_row():
    rows = [
        {"input_ids": [2, 10, 3], "attention_mask": [1, 1, 1], "token_type_ids": [0, 0, 0], "labels": 1, "length": 3},
        {"input_ids": [2, 3], "attention_mask": [1, 1], "token_type_ids": [0, 1], "labels": 0, "length": 2},
    ]
    batch = Collator(pad_token_id=9)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].tolist() == [[2, 10, 3], [2, 3, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0], [0, 1, 0]]
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    assert all(torch.equal(batch[k], v) for k, v in Collator(pad_token_id=9)(columns).items())
    wide = Collator(pad_to_multiple_of=8)(rows)
    assert wide["input_ids"].shape == (2, 8)
    tokens = Collator()(
        [{"input_ids": [2, 5, 3], "labels": [-100, 1, -100]}, {"input_ids": [2, 3], "labels": [-100, -100]}]
    )
    assert tokens["labels"].tolist() == [[-100, 1, -100], [-100, -100, -100]]
    assert tokens["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_collator_with_a_dataloader_and_the_batch_order(sst2, tokenizer, cache):
    train, _ = sst2
    data = _prepare(Source(str(train), "tsv"), None, tokenizer, cache)
    collate = Collator.for_tokenizer(tokenizer)
    batches = train_batches(data.train_lengths, 6, seed=0, epoch=0, group_by_length=True)
    loader = torch.utils.data.DataLoader(data.train, batch_sampler=batches, collate_fn=collate)
    for indices, batch in zip(batches, loader):
        direct = collate.batch(data.train, indices)
        assert all(torch.equal(batch[k], direct[k]) for k in direct)
        assert batch["input_ids"].shape[1] == max(data.train_lengths[i] for i in indices)
        assert batch["labels"].tolist() == [data.train[i]["labels"] for i in indices]


def test_prepare_from_a_loaded_recipe(tmp_path, sst2, tokenizer):
    from kdcli.recipe import load_recipe

    train, dev = sst2
    teacher = make_tiny_bert(tmp_path / "teacher")
    recipe = {
        "teacher": {"model": str(teacher)},
        "student": {"config": str(teacher), "overrides": {"num_hidden_layers": 1}},
        "task": "sequence-classification",
        "data": {
            "train": str(train),
            "eval": str(dev),
            "text_column": "sentence",
            "label_column": "label",
            "max_length": 16,
            "max_train_samples": 10,
            "group_by_length": True,
        },
        "training": {"num_steps": 1, "batch_size": 4, "output_dir": str(tmp_path / "out")},
        "distillation": {"temperature": 4},
    }
    (tmp_path / "r.json").write_text(json.dumps(recipe), encoding="utf-8")
    data = prepare_from_recipe(load_recipe(tmp_path / "r.json"), tokenizer, cache_dir=str(tmp_path / "cache"))
    assert len(data.train) == 10 and len(data.eval) == 12 and data.labels.num_labels == 2
    assert max(data.train_lengths) <= 16


def test_every_task_has_a_module_behind_the_task_interface():
    from kdcli.tasks import TASKS, task_for
    from kdcli.tasks.base import Task

    for name in TASKS:
        task = task_for(name)
        assert task.name == name and task.auto_class.startswith("AutoModelFor")
        missing = [
            m
            for m in ("encoder", "kd_logits", "kd_term", "target_count", "evaluate")
            if not callable(getattr(task, m, None))
        ]
        assert not missing and set(Task.__annotations__) <= set(dir(task)), name
        # the in-memory logit cache's rows: the encoder tasks only (causal-lm has no method that only raises)
        caches_logits = all(callable(getattr(task, m, None)) for m in ("cache_row", "cache_batch"))
        assert caches_logits == (name != "causal-lm"), name
    with pytest.raises(ValueError, match="unknown task 'translation'.*Fix"):
        task_for("translation")
    token = task_for("token-classification")
    logits, gold = torch.randn(2, 3, 2), torch.tensor([[0, IGNORE_INDEX, 1], [1, 0, IGNORE_INDEX]])
    selected, kept = token.kd_logits(logits, gold)
    assert selected.shape == (4, 2) and kept.tolist() == [0, 1, 1, 0]
