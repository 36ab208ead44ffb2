"""core.optim against Hugging Face's reference: the schedule, warmup length and AdamW's groups."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, TrainingArguments,
                          get_linear_schedule_with_warmup)

from core.demo import tiny_distilbert_config
from core.optim import (build_adamw, clip_gradients, lr_factor, param_groups, set_lr,
                        warmup_steps_for)

PEAK = 3e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(tiny_distilbert_config(100, 3, 32))


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=PEAK)


@pytest.mark.parametrize("warmup,total", [(0, 1), (0, 10), (1, 1), (3, 10), (10, 10), (7, 100),
                                          (1, 2), (50, 313)])
def test_schedule_matches_hf_linear_warmup_step_by_step(warmup, total):
    """The lr our loop sets before optimizer step s equals the lr HF's scheduler gives step s."""
    hf_opt = _optimizer()
    scheduler = get_linear_schedule_with_warmup(hf_opt, warmup, total)
    ours_opt = _optimizer()
    ours, theirs = [], []
    for step in range(total + 1):  # one past the end: the schedule has reached 0
        lr = PEAK * lr_factor(step, warmup, total)
        with set_lr(ours_opt, lr):
            ours.append(ours_opt.param_groups[0]["lr"])
        assert ours[-1] == float(lr)
        theirs.append(hf_opt.param_groups[0]["lr"])
        hf_opt.step()
        scheduler.step()
    assert ours == pytest.approx(theirs, rel=1e-12, abs=0)
    assert ours[-1] == 0.0
    # Not a constant: 0 at the start of a warmup, the peak right after it.
    assert ours[0] == (0.0 if warmup else PEAK)
    if warmup < total:
        assert ours[warmup] == pytest.approx(PEAK) and max(ours) == pytest.approx(PEAK)


def test_the_fused_step_gets_the_lr_as_a_tensor_and_the_groups_keep_a_number(tiny_model):
    """The fused AdamW is handed the lr computed on the device, with no read-back; outside
    the step the groups hold a number, so a saved optimizer state holds no tensor lr."""
    optimizer = build_adamw(tiny_model, 1e-3, 0.01)
    lr = 1e-3 * lr_factor(torch.tensor(3.0, dtype=torch.float64), 4, 10)
    with set_lr(optimizer, lr):
        for group in optimizer.param_groups:
            assert torch.is_tensor(group["lr"]) and group["lr"].dtype == torch.float32
            assert float(group["lr"]) == pytest.approx(0.75e-3)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 1e-3]


def test_schedule_shape_warmup_then_linear_decay():
    factors = [float(lr_factor(s, 4, 12)) for s in range(13)]
    assert factors[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert factors[4:] == pytest.approx([(12 - s) / 8 for s in range(4, 13)])


@pytest.mark.parametrize("total", [1, 7, 10, 25, 100, 313, 1563])
@pytest.mark.parametrize("ratio", [0.0, 0.06, 0.1, 0.3, 0.5, 0.99])
def test_warmup_steps_from_ratio_match_hf(total, ratio):
    # HF: TrainingArguments(warmup_steps=ratio) -> ceil(total * ratio) for ratio < 1.
    hf = TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=ratio), total)
    assert warmup_steps_for(total, ratio, None) == hf == math.ceil(total * ratio)


def test_explicit_warmup_steps_win_over_ratio():
    assert warmup_steps_for(100, 0.5, 7) == 7
    assert warmup_steps_for(100, 0.5, 0) == 0  # 0 is a choice, not "unset"


def test_biases_and_layernorm_weights_are_not_decayed(tiny_model):
    decay, no_decay = param_groups(tiny_model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    not_decayed = {id(p) for p in no_decay["params"]}
    names = dict(tiny_model.named_parameters())
    layernorm_weights = {f"{n}.weight" for n, m in tiny_model.named_modules()
                         if isinstance(m, torch.nn.LayerNorm)}
    assert layernorm_weights and any(n.endswith(".bias") for n in names)
    for name, param in names.items():
        if name.endswith(".bias") or name in layernorm_weights:
            assert id(param) in not_decayed, name
        else:
            assert param.ndim == 2 and id(param) in decayed, name
    # Every trainable parameter is in exactly one group.
    assert len(decayed) + len(not_decayed) == len(names)
    assert not decayed & not_decayed
    # The same split HF's Trainer makes.
    from transformers import Trainer
    hf_decay = set(Trainer.get_decay_parameter_names(None, tiny_model))
    assert {n for n, p in names.items() if id(p) in decayed} == hf_decay


def test_frozen_parameters_are_left_out(tiny_model):
    for param in tiny_model.distilbert.parameters():
        param.requires_grad_(False)
    groups = param_groups(tiny_model, 0.01)
    seen = {id(p) for g in groups for p in g["params"]}
    trainable = {id(p) for p in tiny_model.parameters() if p.requires_grad}
    assert seen == trainable and len(trainable) == 4  # pre_classifier and classifier
    optimizer = build_adamw(tiny_model, 1e-3, 0.01)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 4


def test_adamw_is_fused_on_cpu_and_takes_its_settings(tiny_model):
    optimizer = build_adamw(tiny_model, 2e-5, 0.05, (0.8, 0.95), 1e-6)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is True
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    for group in optimizer.param_groups:
        assert (group["lr"], group["betas"], group["eps"]) == (2e-5, (0.8, 0.95), 1e-6)


def test_decay_is_decoupled_and_only_on_the_decay_group(tiny_model):
    """With zero gradients Adam's update is 0, so only decoupled decay moves a weight."""
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    optimizer = build_adamw(tiny_model, 0.1, 0.5)
    for param in tiny_model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for name, param in tiny_model.named_parameters():
        expected = before[name] * (1 - 0.1 * 0.5) if param.ndim >= 2 else before[name]
        torch.testing.assert_close(param.detach(), expected, msg=name)


def test_fused_step_equals_the_reference_adamw(tiny_model):
    torch.manual_seed(1)
    reference = AutoModelForSequenceClassification.from_config(tiny_model.config)
    reference.load_state_dict(tiny_model.state_dict())
    fused = build_adamw(tiny_model, 1e-3, 0.01)
    plain = torch.optim.AdamW(param_groups(reference, 0.01), lr=1e-3, fused=False,
                              foreach=False)
    ids = torch.randint(0, 100, (4, 12))
    labels = torch.tensor([0, 1, 2, 1])
    for _ in range(3):
        for model, optimizer in ((tiny_model, fused), (reference, plain)):
            model.train(False)
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, a), b in zip(tiny_model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("max_norm,poison", [(0.1, False), (100.0, False), (float("inf"), False),
                                              (1.0, True)])  # clipped, not, unlimited, NaN
def test_clipping_matches_torchs_and_touches_no_gradient_it_leaves_as_is(tiny_model, max_norm,
                                                                         poison):
    from accelerate import Accelerator
    ids, labels = torch.randint(0, 100, (4, 12)), torch.tensor([0, 1, 2, 1])
    tiny_model(input_ids=ids, labels=labels).loss.backward()
    params = list(tiny_model.parameters())
    params[0].grad = None  # a weight the batch did not reach
    if poison:
        params[1].grad[0] = float("nan")
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for ref, param in zip(reference, params):
        ref.grad = None if param.grad is None else param.grad.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(reference, max_norm)
    versions = [p.grad._version for p in params[1:]]
    norm = clip_gradients(Accelerator(cpu=True), params, max_norm)
    torch.testing.assert_close(norm, expected_norm, rtol=0, atol=0, equal_nan=True)
    assert poison or 0.1 < norm < 100  # so the first two cases do clip, and do not
    for param, ref in zip(params[1:], reference[1:]):  # bit for bit, scaled or not
        torch.testing.assert_close(param.grad, ref.grad, rtol=0, atol=0, equal_nan=True)
    # Only a clip that scales writes to the gradients (torch's multiplies them all by 1.0).
    written = [p.grad._version != v for p, v in zip(params[1:], versions)]
    assert all(written) if poison or norm > max_norm else not any(written)
