"""eval/lm.py: the shifted token loss and the token-weighted eval loss over a whole set."""

import math

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from core.collate import pad_batch
from core.demo import tiny_llama_config
from eval.lm import (evaluate_lm, output_head, plot_loss_vs_r, smooth, target_count,
                     target_loss_sum, token_loss_sum)

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config(VOCAB)).eval()


def rows(n: int, seed: int = 0) -> list[dict]:
    """Rows of unequal length whose first few tokens are an unlabelled prompt."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (5 + 3 * i,), generator=generator).tolist()
        prompt = 2 + i % 3
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_token_loss_matches_the_models_own_labels_loss(model):
    batch = pad_batch(rows(4), pad_id=0)
    with torch.no_grad():
        out = model(**batch)  # HF shifts internally and averages over non -100 targets
        ours = token_loss_sum(out.logits, batch["labels"]) / target_count(batch["labels"])
    torch.testing.assert_close(ours, out.loss)


def grads_of(model, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def test_head_on_targets_only_gives_the_models_own_loss_and_gradients():
    """The LM head runs on target positions only (speed issue, item 2), yet the loss
    and every gradient equal those of the model's own `labels=` loss, in fp32."""
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_llama_config(VOCAB)).train()
    batch = pad_batch(rows(4), pad_id=0)
    count = target_count(batch["labels"])
    seen = []
    handle = lm.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    ours, ours_grads = grads_of(lm, lambda: target_loss_sum(lm, output_head(lm), batch) / count)
    handle.remove()
    theirs, their_grads = grads_of(lm, lambda: lm(**batch).loss)
    assert seen == [(int(count), lm.config.hidden_size)]  # one row per target, no more
    torch.testing.assert_close(ours, theirs)
    assert ours_grads.keys() == their_grads.keys()
    for name in their_grads:
        torch.testing.assert_close(ours_grads[name], their_grads[name], rtol=1e-5, atol=1e-7)


def test_head_on_targets_only_trains_a_lora_adapter_on_the_head():
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_llama_config(VOCAB))
    lm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                         lora_dropout=0.0, init_lora_weights=False))
    batch = pad_batch(rows(3), pad_id=0)
    count = target_count(batch["labels"])
    ours, ours_grads = grads_of(lm, lambda: target_loss_sum(lm, output_head(lm), batch) / count)
    theirs, their_grads = grads_of(lm, lambda: lm(**batch).loss)
    torch.testing.assert_close(ours, theirs)
    head = [n for n in their_grads if "lm_head.lora_" in n]
    assert len(head) == 2 and all(ours_grads[n].abs().sum() > 0 for n in head)
    for name in their_grads:
        torch.testing.assert_close(ours_grads[name], their_grads[name], rtol=1e-5, atol=1e-7)


def test_a_batch_without_targets_still_back_propagates():
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_llama_config(VOCAB))
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}], pad_id=0)
    loss = target_loss_sum(lm, output_head(lm), batch)
    loss.backward()
    assert loss.item() == 0.0


def test_target_count_excludes_the_first_position_and_masked_labels():
    labels = torch.tensor([[5, 6, -100, 7], [-100, -100, 8, -100]])
    assert target_count(labels) == 3  # 6, 7 and 8: position 0 has nothing before it


def test_eval_loss_weights_every_token_across_batches(model):
    data = rows(7)
    result = evaluate_lm(model, data, lambda r: pad_batch(r, 0), batch_size=2,
                         accelerator=Accelerator(cpu=True))
    whole = pad_batch(data, 0)  # one batch of everything: the same mean over tokens
    with torch.no_grad():
        expected = float(model(**whole).loss)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["n_eval"] == 7 and result["n_eval_tokens"] == int(target_count(whole["labels"]))


def test_smoothing_starts_at_the_first_value_and_follows_a_constant():
    assert smooth([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])
    assert smooth([2.0, 0.0])[0] == pytest.approx(2.0)


def test_sweep_plot_is_written(tmp_path):
    curves = {4: [(1, 3.0), (2, 2.5)], 8: [(1, 3.0), (2, 2.2)]}
    evals = {4: [(2, 2.6)], 8: [(1, 2.5), (2, 2.4)]}
    plot_loss_vs_r(curves, evals, {4: 2.6, 8: 2.4}, 3.1, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
