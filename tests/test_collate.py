"""core.collate.pad_batch against a padding written out row by row."""

import numpy as np
import torch

from core.collate import pad_batch


def reference(rows, pad_id, multiple=1):
    longest = max(len(r["input_ids"]) for r in rows)
    width = -(-longest // multiple) * multiple
    out = {"input_ids": torch.full((len(rows), width), pad_id),
           "attention_mask": torch.zeros((len(rows), width), dtype=torch.long)}
    for key in rows[0].keys() - {"input_ids", "labels"}:
        out[key] = torch.zeros((len(rows), width), dtype=torch.long)
    if "labels" in rows[0] and isinstance(rows[0]["labels"], list):
        out["labels"] = torch.full((len(rows), width), -100)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        out["input_ids"][i, :n] = torch.tensor(row["input_ids"])
        out["attention_mask"][i, :n] = 1
        for key in rows[0].keys() - {"input_ids"}:
            if key != "labels" or isinstance(row["labels"], list):
                out[key][i, :n] = torch.tensor(row[key])
    if "labels" in rows[0] and not isinstance(rows[0]["labels"], list):
        out["labels"] = torch.tensor([r["labels"] for r in rows])
    return out


def check(rows, pad_id, multiple=1):
    got, want = pad_batch(rows, pad_id, multiple), reference(rows, pad_id, multiple)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == torch.long, key
        assert torch.equal(got[key], want[key]), key


def test_class_labels_and_token_type_ids():
    rows = [{"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 1], "labels": 1},
            {"input_ids": [8], "token_type_ids": [0], "labels": 0},
            {"input_ids": [9, 10, 11, 12, 13], "token_type_ids": [0, 0, 0, 1, 1], "labels": 1}]
    check(rows, pad_id=3)
    check(rows, pad_id=0, multiple=4)


def test_token_labels_padded_with_minus_100():
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
            {"input_ids": [9, 10], "labels": [-100, 10]}]
    check(rows, pad_id=2)
    check(rows, pad_id=2, multiple=8)
    assert pad_batch(rows, 2)["labels"][1].tolist() == [-100, 10, -100, -100]


def test_rows_without_labels():
    check([{"input_ids": [1, 2]}, {"input_ids": [3, 4, 5]}], pad_id=0)


def test_ids_are_int64_whatever_the_rows_hold():
    rows = [{"input_ids": np.array([5, 6], dtype=np.int32), "labels": 1},
            {"input_ids": (7, 8), "labels": 0}]  # no padding needed: no int64 fill value
    batch = pad_batch(rows, 0)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6], [7, 8]]
