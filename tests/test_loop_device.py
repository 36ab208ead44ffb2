"""What core/loop.py asks of the device: no waits inside a step, skips decided on the device."""

import sys

import pytest
import torch
from accelerate import Accelerator

from core import loop
from core.optim import build_adamw
from tests.test_cls_loss_contract import EVAL_ROWS, LABELS, PAD, make_rows, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

READS = ("item", "tolist", "__bool__", "__float__", "__int__")


@pytest.fixture
def host_reads(monkeypatch):
    """(function name) of every tensor read-back made directly by core/loop.py's code."""
    seen = []
    for name in READS:
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename == loop.__file__:
                seen.append(caller.co_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return seen


def prepared(fused: bool = True):
    model = tiny_model()
    accelerator = Accelerator(cpu=True)
    optimizer = build_adamw(model, lr=1e-2, weight_decay=0.1)
    if not fused:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, accelerator


def set_grads(model, value: float):
    for p in model.parameters():
        p.grad = torch.full_like(p, value)


def snapshot(model, optimizer):
    weights = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in s.items()} for s in optimizer.optimizer.state.values()]
    return weights, state


def test_a_non_finite_step_is_skipped_inside_the_fused_kernel(host_reads):
    model, optimizer, accelerator = prepared()
    set_grads(model, 0.5)
    assert bool(loop._optimizer_step(optimizer, accelerator, torch.tensor(True)))
    weights, state = snapshot(model, optimizer)

    set_grads(model, float("nan"))
    applied = loop._optimizer_step(optimizer, accelerator, torch.tensor(False))
    assert not bool(applied)
    after_weights, after_state = snapshot(model, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(weights, after_weights))
    for before, after in zip(state, after_state):  # moments and step count untouched
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert host_reads == []  # decided on the device

    set_grads(model, 0.5)
    assert bool(loop._optimizer_step(optimizer, accelerator, torch.tensor(True)))
    assert all(float(s["step"]) == 2 for s in optimizer.optimizer.state.values())


def test_an_optimizer_without_the_flag_decides_on_the_host(host_reads):
    model, optimizer, accelerator = prepared(fused=False)
    set_grads(model, float("nan"))
    weights, _ = snapshot(model, optimizer)
    assert not bool(loop._optimizer_step(optimizer, accelerator, torch.tensor(False)))
    assert all(torch.equal(a, b) for a, b in zip(weights, snapshot(model, optimizer)[0]))
    assert host_reads == ["_optimizer_step"]  # the spy sees a read where there is one


def test_steps_never_wait_for_the_device_between_read_backs(host_reads, tmp_path):
    from core.config import TrainConfig
    from tasks.classification import ClassificationTask
    model, accelerator = tiny_model(), Accelerator(cpu=True)
    task = ClassificationTask(EVAL_ROWS, PAD, 8, LABELS, accelerator)
    cfg = TrainConfig(model="tiny", batch_size=4, max_steps=8, log_every=4, eval_every=0,
                      group_by_length=True, seed=0)
    rows = make_rows(32, seed=1)
    data = loop.TrainData(rows, task.collate, [len(r["input_ids"]) for r in rows])
    result = loop.train(model, task, data, cfg, accelerator, tmp_path)
    assert result["steps"] == 8
    assert set(host_reads) == {"_flush"}  # reads happen, and only at the read-backs
