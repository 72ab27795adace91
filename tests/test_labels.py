"""kdcli.facts.labels: the one label rule of the run (kdcli.data) and of check-recipe (kdcli.recipe),
and kdcli.facts.tabular: csv/tsv records checked before datasets reads them. Torch-free."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from kdcli.facts import labels
from kdcli.facts.labels import DataError, Labels, label_key, labels_of_splits
from kdcli.facts.tabular import validate_table
from kdcli.recipe import DataSource, data_rules


def test_one_and_one_point_zero_are_one_class() -> None:
    assert {label_key(v) for v in ("1", " 1 ", "+1", "1.0", "1.", "1e0", 1, 1.0, True)} == {1}
    assert labels_of_splits([("t", ["0", "1", "1.0", 1.0, False])]) == Labels("int", ("0", "1"))
    assert label_key("pos") == "pos" and label_key(" pos ") == "pos" and label_key("NaN") == "NaN"


@pytest.mark.parametrize("value", ["0.5", 0.5, "-1.25", "2.5e-1"])
def test_a_score_is_not_a_class(value) -> None:
    with pytest.raises(DataError, match=r"t, row 2: label .* is not a whole number.*Fix: use classes, not scores"):
        labels_of_splits([("t", [1, value])])


@pytest.mark.parametrize("value", ["", "   ", None])
def test_an_empty_or_missing_label_names_the_file_and_row(value) -> None:
    with pytest.raises(
        DataError, match=r"train.tsv, column 'label', row 3: some rows have no label.*Fix: drop unlabelled rows"
    ):
        labels_of_splits([("train.tsv, column 'label'", ["1", "0", value, "1"])])
    with pytest.raises(DataError, match="row 2: some rows have no label"):  # a tag inside a tag list
        labels_of_splits([("ner.jsonl", [["O"], ["B-X", value]])])


def test_ids_mixed_with_names_across_splits_are_refused() -> None:
    with pytest.raises(
        DataError,
        match=r"eval.tsv, row 1: labels mix class ids and names: 0 \(eval.tsv, row 1\) and 'pos' \(train.tsv, row 1\).*Fix",
    ):
        labels_of_splits([("train.tsv", ["pos", "neg"]), ("eval.tsv", ["0", "1"])])


def test_encode_uses_the_same_rule() -> None:
    ids = labels_of_splits([("t", ["0", "2"])])
    assert [ids.encode(v) for v in ("2", "2.0", 1.0, " 0")] == [2, 2, 1, 0]
    with pytest.raises(DataError, match="not a whole number"):
        ids.encode("1.5")
    with pytest.raises(DataError, match="some rows have no label"):
        ids.encode("")
    names = labels_of_splits([("t", ["pos", " neg"])])
    assert names.names == ("neg", "pos") and names.encode("neg ") == 0


def test_run_and_check_sides_share_the_code(tmp_path: Path) -> None:
    """kdcli.data re-exports the labels module's types, and check-recipe counts a file's labels
    exactly as the run infers them ("1" and "1.0" one class; an empty label: not counted)."""
    import kdcli.data

    assert (
        kdcli.data.Labels is Labels
        and kdcli.data.DataError is DataError
        and kdcli.data.infer_labels is labels.infer_labels
    )
    assert not hasattr(data_rules, "_as_int")
    path = tmp_path / "t.tsv"
    path.write_text("label\tsentence\n1\ta\n1.0\tb\n0\tc\n", encoding="utf-8")
    source = DataSource(path=str(path), format="tsv", delimiter="\t")
    assert data_rules.count_labels(source, "label") == 2 == labels.infer_labels(["1", "1.0", "0"]).num_labels
    path.write_text("label\tsentence\n1\ta\n\tb\n", encoding="utf-8")
    assert data_rules.count_labels(source, "label") is None


# --- kdcli.facts.tabular ---------------------------------------------------------------------------


def _csv(tmp_path: Path, text: str, name: str = "d.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _validate(path: Path, tsv: bool = False, label: str | None = "label"):
    return validate_table(
        path, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL, label_column=label
    )


BAD_CSV = [
    (
        "quote open at the end",
        'label,sentence\n0,ok\n1,"a fine film\n0,a dull one\n',
        r"line 3: a quote opened on line 3 is never closed",
    ),
    (
        "text after a closing quote",
        'label,sentence\n1,"a fine film\n0,a dull "one"\n1,ok\n',
        r"line 3: a closing quote is followed by more text",
    ),
    (
        "a quote that swallows a row",
        'label,sentence\n0,ok\n1,"a fine film\n0,a dull one"\n1,fine\n',
        r"line 3: a quote opened on line 3 .* swallows line 4, which reads as a row of its own",
    ),
    (
        "an extra field",
        "label,sentence\n0,ok\n1,a,b\n0,ok\n",
        r"line 3: 3 fields but the header has 2. Fix: quote the fields that contain a comma",
    ),
    (
        "a missing field",
        "label,sentence\n0,ok\n1\n",
        r"line 3: 1 field but the header has 2. Fix: give the record a value for each",
    ),
]


@pytest.mark.parametrize("text, words", [c[1:] for c in BAD_CSV], ids=[c[0] for c in BAD_CSV])
def test_ambiguous_csv_is_refused_with_its_line(tmp_path: Path, text: str, words: str) -> None:
    path = _csv(tmp_path, text)
    with pytest.raises(DataError, match=f"d.csv, {words}"):
        _validate(path)


def test_legal_csv_is_kept(tmp_path: Path) -> None:
    """Quoted delimiters, doubled quotes, blank lines and a review with a line break in it."""
    path = _csv(
        tmp_path, 'label,sentence\n1,"good , film"\n\n0,"say ""hi"""\n1,"great film.\nwould watch again, twice"\n'
    )
    shape = _validate(path)
    assert shape.header == ["label", "sentence"] and shape.rows == 3


def test_tsv_field_counts(tmp_path: Path) -> None:
    path = _csv(tmp_path, 'label\tsentence\n1\t"quoted start\n0\tan extra\ttab\n', "d.tsv")
    with pytest.raises(DataError, match=r"d.tsv, line 3: 3 fields but the header has 2. Fix: remove the extra tab"):
        _validate(path, tsv=True)
    assert _validate(_csv(tmp_path, 'label\tsentence\n1\t"open quote\n', "ok.tsv"), tsv=True).rows == 1


def test_empty_files_and_files_without_rows(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="the file is empty"):
        _validate(_csv(tmp_path, ""))
    with pytest.raises(DataError, match="a header line but no rows"):
        _validate(_csv(tmp_path, "label,sentence\n\n"))
