"""classification_metrics must agree with scikit-learn; the plots must be real PNGs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from eval.classification import classification_metrics, plot_confusion_matrices, plot_confusion_matrix

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header, after checking the magic bytes."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])


def _assert_matches_sklearn(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> None:
    result = classification_metrics(labels, preds, num_labels)
    classes = list(range(num_labels))
    average = "binary" if num_labels == 2 else "macro"
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, preds, labels=classes, average=average, zero_division=0
    )
    per_p, per_r, per_f, per_s = precision_recall_fscore_support(
        labels, preds, labels=classes, average=None, zero_division=0
    )

    assert result["average"] == average
    assert result["n"] == len(labels)
    assert result["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert [result["precision"], result["recall"], result["f1"]] == pytest.approx([precision, recall, f1])
    assert result["confusion_matrix"] == confusion_matrix(labels, preds, labels=classes).tolist()
    assert [c["label"] for c in result["per_class"]] == classes
    assert [c["precision"] for c in result["per_class"]] == pytest.approx(per_p)
    assert [c["recall"] for c in result["per_class"]] == pytest.approx(per_r)
    assert [c["f1"] for c in result["per_class"]] == pytest.approx(per_f)
    assert [c["support"] for c in result["per_class"]] == per_s.tolist()
    # Plain Python types survive a JSON round trip unchanged.
    assert json.loads(json.dumps(result)) == result


@pytest.mark.parametrize("num_labels", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_sklearn_on_random_predictions(num_labels: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_labels, size=200)
    # Mostly right, so the scores are not all near chance.
    preds = np.where(rng.random(200) < 0.7, labels, rng.integers(0, num_labels, size=200))
    _assert_matches_sklearn(labels, preds, num_labels)


@pytest.mark.parametrize(
    ("labels", "preds", "num_labels"),
    [
        pytest.param([0, 1, 2, 2, 1], [0, 1, 1, 0, 1], 3, id="class-never-predicted"),
        pytest.param([0, 0, 1, 1], [0, 0, 0, 0], 2, id="positive-never-predicted"),
        pytest.param([0, 0, 0, 0], [0, 1, 0, 0], 2, id="positive-never-present"),
        pytest.param([0, 1, 0, 1], [0, 1, 0, 1], 4, id="classes-absent-everywhere"),
    ],
)
def test_zero_division_gives_zero(labels: list[int], preds: list[int], num_labels: int) -> None:
    _assert_matches_sklearn(np.array(labels), np.array(preds), num_labels)


def test_accepts_plain_lists() -> None:
    result = classification_metrics([1, 0, 1, 1], [1, 0, 0, 1], 2)
    assert result["accuracy"] == 0.75
    assert result["confusion_matrix"] == [[1, 0], [1, 2]]
    assert (result["precision"], result["recall"]) == (1.0, pytest.approx(2 / 3))


@pytest.mark.parametrize(
    ("labels", "preds", "num_labels", "match"),
    [
        pytest.param([], [], 2, "empty", id="empty"),
        pytest.param([0, 2], [0, 1], 2, "outside", id="label-too-big"),
        pytest.param([0, 1], [0, -1], 2, "outside", id="negative-pred"),
        pytest.param([0, 1, 1], [0, 1], 2, "length", id="length-mismatch"),
        pytest.param([0, 1], [0.2, 0.9], 2, "integer", id="float-preds"),
        pytest.param([0, 0], [0, 0], 1, "at least 2", id="one-class"),
    ],
)
def test_rejects_bad_input(labels: list, preds: list, num_labels: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        classification_metrics(labels, preds, num_labels)


def test_plot_confusion_matrix_writes_png_at_120_dpi(tmp_path: Path) -> None:
    path = tmp_path / "cm.png"
    plot_confusion_matrix([[5, 1], [2, 7]], ["neg", "pos"], path, title="SST-2")
    # The figure is 5 x 4 inches, so 120 dpi means 600 x 480 pixels.
    assert _png_size(path) == (600, 480)


def test_plot_confusion_matrices_writes_one_png(tmp_path: Path) -> None:
    path = tmp_path / "cms.png"
    items = [("full", np.eye(3, dtype=int) * 4), ("lora", [[3, 1, 0], [0, 4, 0], [1, 0, 3]])]
    plot_confusion_matrices(items, ["a", "b", "c"], path)
    width, height = _png_size(path)
    assert width > height > 0  # panels sit side by side


@pytest.mark.parametrize(
    "cm",
    [pytest.param([[1, 2, 3], [4, 5, 6]], id="not-square"), pytest.param(np.eye(3), id="too-many-classes")],
)
def test_plot_rejects_matrix_that_does_not_fit_labels(tmp_path: Path, cm) -> None:
    with pytest.raises(ValueError, match="confusion matrix"):
        plot_confusion_matrix(cm, ["neg", "pos"], tmp_path / "cm.png")
    assert not (tmp_path / "cm.png").exists()
