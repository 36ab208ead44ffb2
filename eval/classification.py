"""Classification metrics and confusion-matrix plots, built on numpy alone.

Everything is derived from one confusion matrix, so the numbers cannot disagree
with the picture. Results are plain Python types so they go straight into
`metrics.json`. Plots use matplotlib's `Figure` class directly rather than
pyplot: no global figure registry, no interactive backend, safe on a headless
training box.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # matplotlib itself is imported where a plot is drawn: it costs a
    # training process ~27 MB of resident memory it would otherwise never use
    from matplotlib.axes import Axes
    from matplotlib.image import AxesImage

PLOT_DPI = 120


def _as_label_array(values: Sequence[int] | np.ndarray, name: str, num_labels: int) -> np.ndarray:
    """Check one side of the (labels, preds) pair and return it as an int array."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: need at least one example to score")
    # Float class ids usually mean logits or probabilities were passed by mistake.
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ValueError(f"{name} must hold integer class ids, got dtype {array.dtype}")
    array = array.astype(np.int64)
    outside = (array < 0) | (array >= num_labels)
    if outside.any():
        bad = int(array[outside][0])
        raise ValueError(f"{name} holds {bad}, outside the valid range [0, {num_labels})")
    return array


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise division that yields 0.0 where the denominator is 0.

    Matches scikit-learn's `zero_division=0`: a class never predicted has
    precision 0, a class never present has recall 0.
    """
    result = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=result, where=denominator != 0)
    return result


def classification_metrics(
    labels: Sequence[int] | np.ndarray,
    preds: Sequence[int] | np.ndarray,
    num_labels: int,
) -> dict[str, Any]:
    """Score predictions against gold labels.

    With two classes the headline precision/recall/F1 are for the positive
    class 1 ("binary"); with more they are unweighted means over all
    `num_labels` classes ("macro"), so rare classes count as much as common ones.
    Per-class figures and the confusion matrix (rows = true, columns =
    predicted) are always included.
    """
    if num_labels < 2:
        raise ValueError(f"num_labels must be at least 2, got {num_labels}")
    y_true = _as_label_array(labels, "labels", num_labels)
    y_pred = _as_label_array(preds, "preds", num_labels)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"labels and preds differ in length: {y_true.size} vs {y_pred.size}")

    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)

    true_positives = np.diag(cm)
    predicted = cm.sum(axis=0)
    support = cm.sum(axis=1)
    precision = _safe_divide(true_positives, predicted)
    recall = _safe_divide(true_positives, support)
    # 2TP / (2TP + FP + FN) equals the harmonic mean of precision and recall,
    # but stays defined (as 0) when both are 0.
    f1 = _safe_divide(2 * true_positives, predicted + support)

    if num_labels == 2:
        average = "binary"
        headline = (precision[1], recall[1], f1[1])
    else:
        average = "macro"
        headline = (precision.mean(), recall.mean(), f1.mean())

    return {
        "accuracy": float(true_positives.sum() / y_true.size),
        "precision": float(headline[0]),
        "recall": float(headline[1]),
        "f1": float(headline[2]),
        "average": average,
        "n": int(y_true.size),
        "confusion_matrix": cm.tolist(),
        "per_class": [
            {
                "label": i,
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in range(num_labels)
        ],
    }


def _as_square_matrix(cm: Sequence[Sequence[int]] | np.ndarray, label_names: list[str]) -> np.ndarray:
    """Check that a confusion matrix is square and matches the label names."""
    matrix = np.asarray(cm)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {matrix.shape}")
    if matrix.shape[0] != len(label_names):
        raise ValueError(
            f"confusion matrix has {matrix.shape[0]} classes but {len(label_names)} label names were given"
        )
    return matrix


def _draw_confusion(ax: Axes, matrix: np.ndarray, label_names: list[str], title: str, vmax: float) -> AxesImage:
    """Draw one annotated heatmap on `ax` and return the image for a colour bar."""
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=vmax)
    ticks = np.arange(len(label_names))
    ax.set_xticks(ticks, labels=label_names)
    ax.set_yticks(ticks, labels=label_names)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title)
    # Dark cells get white text so every count stays readable.
    threshold = vmax / 2
    for row in range(matrix.shape[0]):
        for col in range(matrix.shape[1]):
            count = matrix[row, col]
            ax.text(
                col,
                row,
                str(count),
                ha="center",
                va="center",
                color="white" if count > threshold else "black",
            )
    return image


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]] | np.ndarray,
    label_names: list[str],
    path: str | Path,
    title: str = "Confusion matrix",
) -> None:
    """Save one confusion matrix as an annotated heatmap PNG."""
    from matplotlib.figure import Figure
    matrix = _as_square_matrix(cm, label_names)
    fig = Figure(figsize=(5, 4), layout="constrained")
    ax = fig.subplots()
    # vmax of at least 1 keeps an all-zero matrix from producing a degenerate colour scale.
    image = _draw_confusion(ax, matrix, label_names, title, vmax=max(matrix.max(), 1))
    fig.colorbar(image, ax=ax)
    # A bare Figure is not tracked by pyplot, so there is nothing to close:
    # it is freed as soon as it goes out of scope.
    fig.savefig(path, dpi=PLOT_DPI, format="png")


def plot_confusion_matrices(
    items: list[tuple[str, Sequence[Sequence[int]] | np.ndarray]],
    label_names: list[str],
    path: str | Path,
) -> None:
    """Save several confusion matrices side by side, one titled panel per run.

    All panels share one colour scale so equal shades mean equal counts across
    runs; that is what makes the picture a fair comparison.
    """
    from matplotlib.figure import Figure
    if not items:
        raise ValueError("nothing to plot: items is empty")
    panels = [(name, _as_square_matrix(cm, label_names)) for name, cm in items]
    vmax = max(max(matrix.max() for _, matrix in panels), 1)

    fig = Figure(figsize=(4.5 * len(panels) + 1, 4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, matrix) in zip(axes, panels):
        image = _draw_confusion(ax, matrix, label_names, name, vmax=vmax)
    fig.colorbar(image, ax=list(axes))
    fig.savefig(path, dpi=PLOT_DPI, format="png")
