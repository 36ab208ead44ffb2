"""Sequence classification: labels to ids, tokenisation, the per-example loss, evaluation."""

import inspect
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object

from core.batching import eval_batches, filler
from core.collate import pad_batch
from core.errors import fail
from eval.classification import classification_metrics


@dataclass
class LabelMap:
    names: list[str]   # id -> name

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    @property
    def named(self) -> bool:
        """False where the training labels were bare int ids (names "0", "1", ...)."""
        return self.names != [str(i) for i in range(len(self.names))]


def label_map(train: datasets.Dataset, column: str) -> LabelMap:
    """Ids for the label column; the rows must hold at least two classes.

    The classes the rows hold are counted, not those a `ClassLabel` declares: a cut of
    a data set stored sorted by label can declare two and hold one.
    """
    labels = _label_map(train, column)
    present = sorted(set(label_ids(train, column, labels, "the training data")))
    if len(present) < 2:
        raise fail(f"label column '{column}' of the training data holds one class only "
                   f"({labels.names[present[0]]!r})", "train on examples of at least two classes")
    return labels


def _label_map(train: datasets.Dataset, column: str) -> LabelMap:
    """Int labels are kept as ids, string labels numbered in sorted order."""
    feature = train.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return LabelMap(list(feature.names))
    values = list(train[column])
    if all(isinstance(v, str) for v in values):
        return LabelMap(sorted(set(values)))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise fail(f"label column '{column}' holds negative ids (smallest {min(values)})",
                       "use ids 0..K-1 or string labels")
        return LabelMap([str(i) for i in range(max(values) + 1)])
    kinds = sorted({type(v).__name__ for v in values})
    raise fail(f"label column '{column}' holds {'/'.join(kinds)} values, not ints or strings",
               "convert the labels to integer ids or to class names")


def label_ids(rows: datasets.Dataset, column: str, labels: LabelMap, where: str) -> list[int]:
    """The rows' labels as ids of `labels`: names by name, int ids as they are."""
    values = list(rows[column])
    feature = rows.features[column]
    if isinstance(feature, datasets.ClassLabel) and labels.named:
        # A ClassLabel numbers its classes its own way (an eval split's may differ from the
        # training data's sorted names): go by name. -1, "no label", is refused here.
        values = [feature.names[i] for i in _checked_ids(values, len(feature.names), where)]
    if not values or not isinstance(values[0], str):
        return _checked_ids(values, len(labels.names), where)
    unknown = sorted(set(values) - set(labels.names))
    if unknown:
        raise fail(f"{where} has labels not seen in training: {', '.join(map(str, unknown[:5]))}",
                   "make eval labels match the training labels")
    ids = labels.label2id
    return [ids[v] for v in values]


def forward_inputs(model: torch.nn.Module) -> frozenset[str]:
    """The names the model's forward takes: a tokenizer's extra outputs reach it where
    it has a use for them (BERT's token_type_ids), and not where it has none (DistilBERT)."""
    return frozenset(inspect.signature(model.forward).parameters) - {"labels"}


def one_class_warning(rows: list[dict], labels: LabelMap, where: str) -> str | None:
    """A warning line for tokenised rows of a single class, None for rows of several."""
    present = {row["labels"] for row in rows}
    if len(present) != 1:
        return None
    return (f"warning: {where} holds one class only ({labels.names[present.pop()]!r}): its "
            f"precision, recall and F1 say little (those of a class it lacks read 0)")


def _checked_ids(values: list, n: int, where: str) -> list[int]:
    bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n]
    if bad:
        raise fail(f"{where} has labels outside 0..{n - 1} (e.g. {bad[0]!r})",
                   "make eval labels match the training labels")
    return values


def tokenize(rows: datasets.Dataset, tokenizer, text_column: str, pair_column: str | None,
             label_column: str, labels: LabelMap, max_length: int, where: str) -> list[dict]:
    """Tokenise once, truncating to `max_length`; padding waits for the batch.

    A row keeps every per-token output of the tokenizer (BERT's token_type_ids, which
    mark a pair's second text) but the attention mask, which padding builds: the model
    must see in training and evaluation what `tokenizer(a, b)` gives it when served.
    """
    texts = list(rows[text_column])
    pairs = list(rows[pair_column]) if pair_column else None
    for name, column in ((text_column, texts), (pair_column, pairs)):
        if column is not None and not all(isinstance(t, str) for t in column):
            raise fail(f"text column '{name}' of {where} holds non-text values",
                       "name a column of strings")
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    ids = label_ids(rows, label_column, labels, where)
    extra = [key for key in encoded if key not in ("input_ids", "attention_mask")]
    return [{"input_ids": input_ids, **{key: encoded[key][i] for key in extra}, "labels": label}
            for i, (input_ids, label) in enumerate(zip(encoded["input_ids"], ids))]


class ClassificationTask:
    """Plugs sequence classification into core.loop: the loss is a mean over examples."""

    unit = "examples"

    def __init__(self, eval_rows: list[dict], pad_id: int, eval_batch_size: int,
                 num_labels: int, accelerator, pad_multiple: int = 1,
                 model_inputs: Collection[str] = ("input_ids", "attention_mask")):
        self.eval_rows = eval_rows
        self.model_inputs = frozenset(model_inputs)  # what of a batch the model is given
        self.pad_id = pad_id
        self.pad_multiple = pad_multiple
        self.eval_batch_size = eval_batch_size
        self.num_labels = num_labels
        self.accelerator = accelerator
        self.predictions: list[dict[str, Any]] = []

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return pad_batch(rows, self.pad_id, self.pad_multiple)

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The batch's tensors the model takes (not the labels: the loss is ours), and
        no key/value cache where the model would build one (a decoder's last-token
        classifier): nothing reads it, and under --compile it makes each layer a graph."""
        inputs: dict[str, Any] = {key: value for key, value in batch.items()
                                  if key in self.model_inputs}
        return inputs | ({"use_cache": False} if "use_cache" in self.model_inputs else {})

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(len(batch["labels"]), device=batch["labels"].device)

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**self._inputs(batch)).logits
        # In fp32: softmax over bf16 logits loses the small differences the loss is made of.
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        """Metrics over the whole eval set; each rank scores its shard, results are gathered."""
        acc = self.accelerator
        lengths = [len(r["input_ids"]) for r in self.eval_rows]
        local = []
        for idx in eval_batches(len(self.eval_rows), self.eval_batch_size, acc.num_processes,
                                acc.process_index, lengths):
            batch = {k: v.to(acc.device) for k, v in
                     self.collate([self.eval_rows[i] for i in filler(idx)]).items()}
            with acc.autocast():
                logits = model(**self._inputs(batch)).logits.float()
            losses = F.cross_entropy(logits, batch["labels"], reduction="none")
            probs = logits.softmax(-1)
            local += [(i, int(label), float(loss), p) for i, label, loss, p in  # none if filler
                      zip(idx, batch["labels"].tolist(), losses.tolist(), probs.tolist())]
        # Every rank's results on every rank; each eval example appears exactly once.
        rows = sorted(gather_object(local), key=lambda r: r[0])
        labels = np.array([r[1] for r in rows])
        probs = np.array([r[3] for r in rows])
        preds = probs.argmax(-1)
        metrics = classification_metrics(labels, preds, self.num_labels)
        metrics["loss"] = float(np.mean([r[2] for r in rows]))
        metrics["n_eval"] = len(rows)
        self.predictions = [{"index": i, "label": int(y), "prediction": int(p),
                             "probabilities": [round(x, 6) for x in pr]}
                            for (i, *_), y, p, pr in zip(rows, labels, preds, probs.tolist())]
        return metrics
