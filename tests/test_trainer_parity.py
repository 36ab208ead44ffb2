"""rawtune's loop against Hugging Face `Trainer`: the same 20 steps, the same losses.

Both sides start from one tiny dropout-free DistilBERT and see the same batches in the
same order (a sequential sampler there, the identity epoch order here), with AdamW,
linear warmup and decay, weight decay and gradient clipping set alike. Trainer's
defaults in transformers 5.x that this relies on: `adamw_torch_fused` (ours is the
fused kernel too), no decay for biases and LayerNorm weights (ours: no decay for 1-D
tensors — asserted to be the same set below), and a mean cross-entropy per batch, which
equals our sum / count when batches are equally sized.
"""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import SequentialSampler
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

import core.batching
from core.collate import pad_batch
from core.config import TrainConfig
from core.demo import tiny_distilbert_config
from core.loop import TrainData, train
from core.optim import param_groups
from tasks.classification import ClassificationTask
from tasks.head_row import first_row_only

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_worker import VOCAB, synthetic_rows  # noqa: E402

STEPS, BATCH, LR, WARMUP, DECAY, CLIP = 20, 4, 1e-3, 4, 0.01, 1.0


pytestmark = pytest.mark.usefixtures("one_thread")


class SequentialTrainer(Trainer):
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(
        tiny_distilbert_config(VOCAB, num_labels=2, max_length=32, dropout=0.0))


@pytest.fixture(scope="module")
def rows():
    return synthetic_rows(40, 1)  # 10 batches of 4: 20 steps are two passes


def trainer_run(model, rows, out):
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        max_steps=STEPS, learning_rate=LR, weight_decay=DECAY, warmup_steps=WARMUP,
        lr_scheduler_type="linear", max_grad_norm=CLIP, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
        eval_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0)
    assert args.optim == "adamw_torch_fused"
    trainer = SequentialTrainer(model=model, args=args, train_dataset=rows,
                                data_collator=lambda batch: pad_batch(batch, 0))
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h]


def rawtune_run(model, rows, out, monkeypatch):
    monkeypatch.setattr(core.batching, "epoch_order", lambda n, seed, epoch: list(range(n)))
    accelerator = Accelerator(cpu=True)
    cfg = TrainConfig(model="tiny", batch_size=BATCH, max_steps=STEPS, lr=LR, weight_decay=DECAY,
                      warmup_steps=WARMUP, max_grad_norm=CLIP, group_by_length=False, seed=0,
                      log_every=STEPS, eval_batch_size=8)
    task = ClassificationTask(rows[:8], 0, 8, 2, accelerator)
    out.mkdir()
    train(model, task, TrainData(rows, task.collate), cfg, accelerator, out)
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()
            if '"train"' in line]


def test_weight_decay_goes_to_the_same_parameters(model, tmp_path):
    trainer = SequentialTrainer(model=model, args=TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True))
    names = {id(p): n for n, p in model.named_parameters()}
    ours = {names[id(p)] for p in param_groups(model, DECAY)[0]["params"]}
    assert ours == set(trainer.get_decay_parameter_names(model))


@pytest.mark.parametrize("head_row_only", [False, True])  # train_cls.py's default: True
def test_per_step_losses_match_trainer(model, rows, tmp_path, monkeypatch, head_row_only):
    theirs_model, ours_model = copy.deepcopy(model), copy.deepcopy(model)
    if head_row_only:
        assert first_row_only(ours_model)
    trainer, theirs = trainer_run(theirs_model, rows, tmp_path / "hf")
    ours = rawtune_run(ours_model, rows, tmp_path / "rawtune", monkeypatch)
    assert len(theirs) == len(ours) == STEPS
    for step, (t, o) in enumerate(zip(theirs, ours), start=1):
        assert o["step"] == t["step"] == step
        assert o["lr"] == pytest.approx(t["learning_rate"], rel=1e-12), step
        assert o["loss"] == pytest.approx(t["loss"], rel=1e-5), step
        assert o["grad_norm"] == pytest.approx(t["grad_norm"], rel=1e-4), step
    # The losses moved: the comparison covers real updates, not 20 copies of the first.
    assert abs(ours[-1]["loss"] - ours[0]["loss"]) > 1e-3
    for (name, a), b in zip(ours_model.named_parameters(), theirs_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
