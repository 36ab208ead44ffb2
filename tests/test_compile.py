"""--compile: the compiled model trains like the eager one (dropout off, so no RNG differs)."""

import json

import pytest
import torch
from accelerate import Accelerator

from core.config import TrainConfig
from core.loop import TrainData, train
from tasks.classification import ClassificationTask
from tests.test_cls_loss_contract import EVAL_ROWS, LABELS, PAD, make_rows, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def run(tmp_path, compile_: bool):
    model, accelerator = tiny_model(), Accelerator(cpu=True)
    task = ClassificationTask(EVAL_ROWS, PAD, 8, LABELS, accelerator)
    # Every row as long as the next: one batch shape, so one compilation.
    rows = make_rows(24, seed=1, min_len=16, max_len=16)
    cfg = TrainConfig(model="tiny", batch_size=8, max_steps=4, lr=1e-3, seed=0,
                      group_by_length=False, compile=compile_)
    out = tmp_path / f"compile-{compile_}"
    out.mkdir()
    result = train(model, task, TrainData(rows, task.collate), cfg, accelerator, out)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return result, [r["loss"] for r in records if r["type"] == "train"], model


def test_compiled_model_trains_like_the_eager_one(tmp_path):
    from torch._dynamo.utils import counters
    eager, eager_losses, eager_model = run(tmp_path, False)
    counters.clear()
    compiled, losses, model = run(tmp_path, True)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did capture the model
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    assert compiled["eval"]["loss"] == pytest.approx(eager["eval"]["loss"], rel=1e-4)
    # Compiled in place: the weights keep their names, so checkpoints and saving are unchanged.
    assert model.state_dict().keys() == eager_model.state_dict().keys()
    for name, weight in eager_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], weight, rtol=1e-3, atol=1e-5)
