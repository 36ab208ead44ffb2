"""core.data readers and tasks.classification's label mapping, with their errors."""

import json

import datasets
import pandas as pd
import pytest

from core.data import load_file, load_split, require_columns, take
from core.errors import UsageError
from tasks.classification import label_ids, label_map

ROWS = [{"text": "a fine film", "label": 1}, {"text": "dull, and too long", "label": 0},
        {"text": 'she said "wow" twice', "label": 1}]


def write_rows(path, rows=ROWS):
    """Write ROWS in the format the suffix names; returns the path as a string."""
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        # As GLUE writes them: no quoting at all, quotes are part of the text.
        path.write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    return str(path)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_load_every_format(tmp_path, suffix):
    rows = load_file(write_rows(tmp_path / f"train{suffix}"))
    assert isinstance(rows, datasets.Dataset)
    assert rows.column_names == ["text", "label"]
    assert list(rows["text"]) == [r["text"] for r in ROWS]
    assert list(rows["label"]) == [1, 0, 1]


def test_tsv_quotes_are_text(tmp_path):
    """With quoting on, a field opening with `"` would swallow the tabs and lines after it."""
    path = tmp_path / "q.tsv"
    path.write_text('sentence\tlabel\n" a quote opens the text \t1\n'
                    "it 's `` great '' \t0\nthe end \"\t1\n")
    rows = load_file(str(path))
    assert list(rows["sentence"]) == ['" a quote opens the text ', "it 's `` great '' ",
                                      'the end "']
    assert list(rows["label"]) == [1, 0, 1]


def test_csv_quoting_still_works(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('text,label\n"one, two",1\n"say ""hi""",0\n')
    assert list(load_file(str(path))["text"]) == ["one, two", 'say "hi"']


@pytest.mark.parametrize("name,content,message", [
    ("missing.csv", None, "data file not found"),
    ("empty.csv", b"", "data file is empty"),
    ("empty.jsonl", b"", "data file is empty"),
    ("header_only.csv", b"text,label\n", "has no rows"),
    ("blank.jsonl", b"\n\n", "has no rows"),
    ("latin1.csv", "text,label\ncaf\xe9 cr\xe8me,1\n".encode("latin-1"), "not UTF-8"),
    ("latin1.tsv", "text\tlabel\ncaf\xe9 cr\xe8me\t1\n".encode("latin-1"), "not UTF-8"),
    ("latin1.jsonl", '{"text": "caf\xe9", "label": 1}\n'.encode("latin-1"), "not UTF-8"),
    ("broken.json", b'[{"text": "a", ', "cannot read"),
    ("broken.parquet", b"PAR1 not really", "cannot read"),
    ("train.txt", b"text,label\na,1\n", "unsupported data file type '.txt'"),
    ("train", b"text,label\na,1\n", "unsupported data file type ''"),
    ("train.xlsx", b"PK", "use one of .csv, .tsv, .json, .jsonl, .parquet"),
])
def test_unreadable_files_are_usage_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=message) as err:
        load_file(str(path))
    text = str(err.value)
    assert "\n" not in text and " — " in text  # one line: what is wrong — how to fix it
    if content is not None:
        assert name in text


def test_a_directory_is_not_a_data_file(tmp_path):
    with pytest.raises(UsageError, match="data file not found"):
        load_file(str(tmp_path))


def test_load_split_needs_a_file_or_a_dataset():
    with pytest.raises(UsageError, match="no data given"):
        load_split(None, None, "train")


def test_unknown_hub_dataset_fails_fast_offline():
    with pytest.raises(UsageError, match="cannot load data set 'no-such-user/no-such-data-xyz'"):
        load_split("no-such-user/no-such-data-xyz", None, "train")


def test_require_columns_names_the_flag_and_the_columns():
    rows = datasets.Dataset.from_list(ROWS)
    require_columns(rows, {"text-column": "text", "text-pair-column": None}, "the data")
    with pytest.raises(UsageError, match=r"column 'sentence' not found in the eval data "
                                         r"\(columns: text, label\) — .*--text-column"):
        require_columns(rows, {"text-column": "sentence"}, "the eval data")


def test_take_is_a_seeded_sample_in_the_datas_order():
    """Issue #16, item 3: --max-*-samples took the first N rows, and a data set stored sorted
    by label (IMDb's are) gave a quick run one class."""
    rows = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(100)],
                                       "label": [0] * 50 + [1] * 50})
    cut = take(rows, 10, seed=0)
    assert len(cut) == 10 and set(cut["label"]) == {0, 1}
    assert list(cut["text"]) == list(take(rows, 10, seed=0)["text"])  # the same rows per seed
    assert list(cut["text"]) != list(take(rows, 10, seed=1)["text"])
    kept = [int(text.split()[1]) for text in cut["text"]]
    assert kept == sorted(kept)
    for limit in (100, 500, None):  # nothing to cut: every row, in order
        assert list(take(rows, limit, seed=0)["text"]) == list(rows["text"])


# --- labels ---------------------------------------------------------------------------------

def ds(labels, feature=None):
    features = None
    if feature is not None:
        features = datasets.Features({"text": datasets.Value("string"), "label": feature})
    return datasets.Dataset.from_dict({"text": ["t"] * len(labels), "label": labels},
                                      features=features)


def test_string_labels_get_sorted_ids():
    train = ds(["pos", "neg", "neutral", "pos"])
    labels = label_map(train, "label")
    assert labels.names == ["neg", "neutral", "pos"]
    assert labels.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert labels.label2id == {"neg": 0, "neutral": 1, "pos": 2}
    assert label_ids(train, "label", labels, "train") == [2, 0, 1, 2]
    assert label_ids(ds(["neutral", "neg"]), "label", labels, "eval") == [1, 0]


def test_class_label_names_are_kept_in_their_order():
    feature = datasets.ClassLabel(names=["positive", "negative"])  # not sorted
    train = ds([1, 0, 0], feature)
    labels = label_map(train, "label")
    assert labels.names == ["positive", "negative"]
    assert label_ids(train, "label", labels, "train") == [1, 0, 0]


@pytest.mark.parametrize("values,feature,name", [
    ([0, 0, 0], datasets.ClassLabel(names=["neg", "pos"]), "neg"),
    ([1, 1], None, "1"),  # ids 0..1, but only 1 is there
])
def test_one_class_check_counts_the_labels_present(values, feature, name):
    """Issue #16, item 3: with a ClassLabel column the one-class check read the declared
    names, not the labels the rows hold, and never fired."""
    with pytest.raises(UsageError, match=rf"holds one class only \('{name}'\)"):
        label_map(ds(values, feature), "label")


def test_class_label_eval_ids_are_mapped_by_name():
    """Issue #16, item 4: eval ClassLabel ids were used as they are, so string training
    labels (numbered in sorted order) and a ClassLabel eval split silently swapped classes."""
    labels = label_map(ds(["pos", "neg", "pos"]), "label")  # neg = 0, pos = 1
    evaluation = ds([0, 1, 1], datasets.ClassLabel(names=["pos", "neg"]))  # pos = 0 here
    assert label_ids(evaluation, "label", labels, "the eval data") == [1, 0, 0]
    # Training ids without names: the eval ids can only be taken as ids.
    bare = label_map(ds([0, 1]), "label")
    assert label_ids(evaluation, "label", bare, "the eval data") == [0, 1, 1]


def test_class_label_eval_names_unknown_to_training_are_refused():
    """Issue #16, item 4: an eval class the training data lacks is named in one line."""
    labels = label_map(ds(["neg", "pos"]), "label")
    feature = datasets.ClassLabel(names=["neg", "pos", "neutral", "mixed"])
    with pytest.raises(UsageError, match=r"^the eval data has labels not seen in training: "
                                         r"neutral — "):
        label_ids(ds([0, 2, 1], feature), "label", labels, "the eval data")
    with pytest.raises(UsageError, match=r"outside 0\.\.3 \(e\.g\. -1\)"):  # unlabelled rows
        label_ids(ds([0, -1], feature), "label", labels, "the eval data")


def test_int_labels_are_ids():
    labels = label_map(ds([2, 0, 2]), "label")
    assert labels.names == ["0", "1", "2"]  # 1 is absent from the rows but a valid id
    assert label_ids(ds([1, 2]), "label", labels, "eval") == [1, 2]


@pytest.mark.parametrize("values,kind", [([True, False], "bool"), ([0.0, 1.0], "float"),
                                         ([0.5, 1.0], "float"), ([None, 1], "NoneType/int")])
def test_bool_float_and_missing_labels_are_rejected(values, kind):
    with pytest.raises(UsageError, match=f"label column 'label' holds {kind} values"):
        label_map(ds(values), "label")


def test_negative_int_labels_are_rejected():
    with pytest.raises(UsageError, match="negative ids"):
        label_map(ds([0, -1, 1]), "label")


def test_eval_label_not_seen_in_training_is_rejected():
    labels = label_map(ds(["neg", "pos"]), "label")
    with pytest.raises(UsageError, match="the eval data has labels not seen in training: "
                                         "mixed, neutral"):
        label_ids(ds(["pos", "neutral", "mixed"]), "label", labels, "the eval data")


@pytest.mark.parametrize("values,bad", [([0, 2], "2"), ([-1, 0], "-1"), ([0.0, 1.0], "0.0")])
def test_eval_int_labels_out_of_range_are_rejected(values, bad):
    labels = label_map(ds([0, 1, 1]), "label")
    with pytest.raises(UsageError, match=rf"outside 0\.\.1 \(e\.g\. {bad}\)"):
        label_ids(ds(values), "label", labels, "the eval data")


def test_string_label_names_are_saved_with_the_run(tmp_path, one_thread):
    """The sorted names reach config.json and the saved model, so predictions read as names."""
    import train_cls
    names = ["pos", "neg", "neutral"]
    rows = [{"text": f"{names[i % 3]} words here {i}", "label": names[i % 3]} for i in range(24)]
    train_file = write_rows(tmp_path / "train.jsonl", rows)
    eval_file = write_rows(tmp_path / "eval.jsonl", rows[:6])
    out = tmp_path / "run"
    assert train_cls.main(["--demo", "--train-file", train_file, "--eval-file", eval_file,
                           "--epochs", "1", "--batch-size", "8", "--max-length", "16",
                           "--output-dir", str(out)]) == 0
    expected = {"0": "neg", "1": "neutral", "2": "pos"}
    assert json.loads((out / "config.json").read_text())["id2label"] == expected
    model_config = json.loads((out / "model" / "config.json").read_text())
    assert model_config["id2label"] == expected
    assert model_config["label2id"] == {v: int(k) for k, v in expected.items()}
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").open()]
    assert [p["label"] for p in predictions] == [2, 0, 1, 2, 0, 1]


def test_a_run_on_data_sorted_by_label_samples_both_classes(tmp_path, capsys, one_thread):
    """Issue #16, item 3, end to end: training rows stored sorted by label, cut with
    --max-train-samples, train on both classes; an eval set of one class is trained on but
    flagged, as its precision, recall and F1 say little."""
    import train_cls
    rows = [{"text": f"{name} words here {i}", "label": name}
            for name in ("neg", "pos") for i in range(40)]
    train_file = write_rows(tmp_path / "train.jsonl", rows)
    eval_file = write_rows(tmp_path / "eval.jsonl", rows[:10])  # "neg" only
    out = tmp_path / "run"
    assert train_cls.main(["--demo", "--train-file", train_file, "--eval-file", eval_file,
                           "--max-train-samples", "16", "--max-steps", "1", "--batch-size", "8",
                           "--max-length", "16", "--output-dir", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["n_train"] == 16
    assert "warning: the eval data holds one class only ('neg')" in capsys.readouterr().out
