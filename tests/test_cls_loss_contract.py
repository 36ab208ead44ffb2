"""The loss contract of core/loop.py, for classification.

Each micro-batch back-propagates `its summed loss / the window's example count`, so
the gradients of an accumulation window equal those of one big batch's mean loss,
whatever the micro-batch sizes. Checked first on the gradients themselves, then on
`core.loop.train`: 4 micro-batches of 4 must train exactly like 1 batch of 16.
Dropout is 0 throughout, so the two ways of batching draw no different masks.
"""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import AutoModelForSequenceClassification

from core.collate import pad_batch
from core.config import TrainConfig
from core.demo import tiny_distilbert_config
from core.loop import TrainData, train
from tasks.classification import ClassificationTask

VOCAB, LABELS, PAD = 120, 3, 0


def make_rows(n: int, seed: int, min_len: int = 3, max_len: int = 40) -> list[dict]:
    """Rows of random lengths; token `1 + label` marks the label, so there is something to learn."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(LABELS)
        ids = [rng.randrange(LABELS + 1, VOCAB) for _ in range(rng.randint(min_len, max_len))]
        ids[rng.randrange(len(ids))] = 1 + label
        rows.append({"input_ids": ids, "labels": label})
    return rows


def tiny_model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_distilbert_config(VOCAB, LABELS, max_length=64, dropout=0.0)
    return AutoModelForSequenceClassification.from_config(config).to(dtype)


def task_for(eval_rows=(), accelerator=None) -> ClassificationTask:
    return ClassificationTask(list(eval_rows), PAD, 8, LABELS, accelerator)


pytestmark = pytest.mark.usefixtures("one_thread")


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


# Unequal micro-batches: 2 + 7 + 1 + 6 = 16 examples, each padded to its own longest row.
SIZES = [2, 7, 1, 6]


@pytest.fixture(scope="module")
def micro_batches():
    rows = make_rows(sum(SIZES), seed=1)
    starts = [sum(SIZES[:i]) for i in range(len(SIZES))]
    batches = [pad_batch(rows[s:s + n], PAD) for s, n in zip(starts, SIZES)]
    assert len({b["input_ids"].shape[1] for b in batches}) > 1  # padding differs per batch
    return rows, batches


def test_accumulated_gradients_equal_one_big_batch(micro_batches):
    rows, batches = micro_batches
    model, task = tiny_model(torch.float64), task_for()
    model.train()

    # The loop's way: count first, then backward(loss_sum / n_total) per micro-batch.
    n_total = sum(task.count(b) for b in batches)
    assert int(n_total) == 16
    for batch in batches:
        (task.loss_sum(model, batch) / n_total).backward()
    accumulated = grads(model)

    # One batch of all 16, mean cross-entropy.
    big = pad_batch(rows, PAD)
    logits = model(input_ids=big["input_ids"], attention_mask=big["attention_mask"]).logits
    F.cross_entropy(logits, big["labels"]).backward()
    reference = grads(model)

    assert accumulated.keys() == reference.keys() and len(reference) > 10
    for name in reference:
        torch.testing.assert_close(accumulated[name], reference[name], msg=name)

    # The shortcut (mean per micro-batch / number of micro-batches) gives other gradients:
    # this comparison is sharp enough to tell them apart.
    for batch in batches:
        (task.loss_sum(model, batch) / task.count(batch) / len(batches)).backward()
    shortcut = grads(model)
    name = "classifier.weight"
    assert not torch.allclose(shortcut[name], reference[name], rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_sum_over_count_is_hf_mean_cross_entropy(micro_batches, dtype):
    _, batches = micro_batches
    model, task = tiny_model(dtype), task_for()
    model.eval()
    for batch in batches:
        ours = task.loss_sum(model, batch) / task.count(batch)
        hf = model(**batch).loss  # `labels=`: HF's own mean cross-entropy
        torch.testing.assert_close(ours.to(dtype), hf)
        assert task.count(batch) == len(batch["labels"])
    # A sum, not a mean: doubling the batch doubles it.
    doubled = {k: torch.cat([v, v]) for k, v in batches[1].items()}
    torch.testing.assert_close(task.loss_sum(model, doubled), 2 * task.loss_sum(model, batches[1]))


# --- through core.loop.train ---------------------------------------------------------------

N_TRAIN = 70  # not a multiple of 16: each epoch ends in a short window of 6 examples
EVAL_ROWS = make_rows(8, seed=3)


class ShortcutTask(ClassificationTask):
    """Breaks the contract: each micro-batch's *mean* loss, scaled as if batches were full."""

    def loss_sum(self, model, batch):
        return super().loss_sum(model, batch) / self.count(batch) * 4


def run_loop(tmp_path, name: str, batch_size: int, grad_accum: int, task_cls=ClassificationTask):
    rows = make_rows(N_TRAIN, seed=2)
    model = tiny_model()
    accelerator = Accelerator(cpu=True)
    task = task_cls(EVAL_ROWS, PAD, 8, LABELS, accelerator)
    cfg = TrainConfig(model="tiny", batch_size=batch_size, grad_accum=grad_accum, epochs=2,
                      lr=2e-3, weight_decay=0.01, warmup_steps=2, max_grad_norm=1.0,
                      group_by_length=False, seed=0, log_every=1)
    out = tmp_path / name
    out.mkdir()
    result = train(model, task, TrainData(rows, task.collate, None), cfg, accelerator, out)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "train"]
    weights = {n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
    return result, steps, weights


@pytest.fixture(scope="module")
def big_batch_run(tmp_path_factory):
    return run_loop(tmp_path_factory.mktemp("loop"), "b16", batch_size=16, grad_accum=1)


def test_loop_accumulation_trains_like_one_big_batch(tmp_path, big_batch_run):
    result_a, steps_a, weights_a = run_loop(tmp_path, "b4x4", batch_size=4, grad_accum=4)
    result_b, steps_b, weights_b = big_batch_run

    # 70 rows: windows of 16, 16, 16, 16 and a short one of 6, in each of 2 epochs.
    assert [s["units"] for s in steps_a] == [s["units"] for s in steps_b] == [16] * 4 + [6] + \
        [16] * 4 + [6]
    assert result_a["steps"] == result_b["steps"] == 10
    assert [s["lr"] for s in steps_a] == [s["lr"] for s in steps_b]
    losses_a, losses_b = [s["loss"] for s in steps_a], [s["loss"] for s in steps_b]
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    assert max(losses_a[-5:]) < min(losses_a[:2])  # it learnt something
    assert [s["grad_norm"] for s in steps_a] == pytest.approx([s["grad_norm"] for s in steps_b],
                                                              rel=1e-4)
    for name, weight in weights_b.items():
        torch.testing.assert_close(weights_a[name], weight, rtol=1e-4, atol=1e-6, msg=name)
    assert result_a["eval"]["loss"] == pytest.approx(result_b["eval"]["loss"], rel=1e-5)


def test_loop_comparison_catches_a_broken_contract(tmp_path, big_batch_run):
    """The same comparison fails when micro-batches are weighted equally (the shortcut)."""
    _, steps_a, weights_a = run_loop(tmp_path, "shortcut", 4, 4, ShortcutTask)
    _, steps_b, weights_b = big_batch_run
    # The full windows agree (4 equal micro-batches: the shortcut is exact there) ...
    assert steps_a[0]["loss"] == pytest.approx(steps_b[0]["loss"], rel=1e-5)
    # ... the short window of 4 + 2 examples does not, and the weights drift from there on.
    assert steps_a[4]["loss"] != pytest.approx(steps_b[4]["loss"], rel=1e-3)
    drift = max(float((weights_a[n] - w).abs().max()) for n, w in weights_b.items())
    assert drift > 1e-4, drift
