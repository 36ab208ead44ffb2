"""ChunkedAttention computes attention with dropout as the plain math does, mask for mask."""

import json

import pytest
import torch
from torch import nn

import core.attention as attention
from core.attention import ChunkedAttention, lane_attention, use_lane_attention
from core.dropout import LANES, dropped_lanes

pytestmark = pytest.mark.usefixtures("lanes_at_every_size")


def plain_attention(q, k, v, bias, keep, keep_scale, scale):
    return (torch.softmax(q @ k.transpose(-1, -2) * scale + bias, -1) * keep * keep_scale) @ v


def mask_of(kind: str, batch: int, length: int) -> torch.Tensor:
    """The masks transformers hands an attention function."""
    if kind == "shared":  # additive, one for the batch, -inf above the diagonal
        return torch.zeros(1, 1, length, length).masked_fill(
            torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    padding = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    padding[1, ..., 20:] = padding[3, ..., 5:] = False
    # sdpa_mask's padding mask: [batch, 1, queries, keys], expanded (stride 0) over queries
    return padding.expand(batch, 1, length, length) if kind == "expanded" else padding


@pytest.mark.parametrize("rows", [1, 2, 5])  # chunks of one, of two (a short last one), all
@pytest.mark.parametrize("kind", ["padding", "expanded", "shared"])
def test_output_and_gradients_are_the_plain_maths_with_the_same_masks(rows, kind, drawn,
                                                                      monkeypatch):
    batch, heads, length, dim, p = 5, 3, 33, 8, 0.3
    monkeypatch.setattr(attention, "CHUNK_BYTES", rows * heads * length * length * 4)
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, dim, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    mask = mask_of(kind, batch, length)
    bias = attention._additive(mask, False, length, length, "cpu")
    out = ChunkedAttention.apply(q, k, v, bias, dropped_lanes(p), 0.4)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)

    assert len(drawn) == -(-batch // rows)
    keep = torch.cat(drawn)
    assert keep.float().mean().item() == pytest.approx(1 - p, abs=0.03)
    additive = (mask.double() if kind == "shared"
                else torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf")))
    reference = plain_attention(q, k, v, additive, keep, LANES / (LANES - dropped_lanes(p)), 0.4)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)  # fp32 inside
    for got, want in zip(ours, torch.autograd.grad(reference, (q, k, v), grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_causal_decoder_with_grouped_heads_attends_to_the_past_only(drawn):
    class Module(nn.Module):
        num_key_value_groups, is_causal = 2, True
    torch.manual_seed(1)
    q = torch.randn(2, 4, 6, 8, requires_grad=True)
    k, v = torch.randn(2, 2, 6, 8, requires_grad=True), torch.randn(2, 2, 6, 12, requires_grad=True)
    out, weights = lane_attention(Module(), q, k, v, None, dropout=0.2)
    assert weights is None and out.shape == (2, 6, 4, 12)  # [batch, length, heads, v's dim]
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    bias = torch.zeros(6, 6).masked_fill(future, float("-inf"))
    want = plain_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), bias, drawn[0],
                           LANES / (LANES - dropped_lanes(0.2)), 8 ** -0.5).transpose(1, 2)
    torch.testing.assert_close(out, want)
    for got, expected in zip(ours, torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("case", ["no dropout", "position_bias", "softcap", "output_attentions",
                                  "trained mask"])
def test_what_it_does_not_compute_is_transformers_sdpa(case, drawn):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module(nn.Module):
        num_key_value_groups, is_causal = 1, False
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    mask = torch.zeros(2, 1, 5, 5, requires_grad=case == "trained mask")
    kwargs = {"dropout": 0.0 if case == "no dropout" else 0.1}
    if case in ("position_bias", "output_attentions"):
        kwargs[case] = torch.zeros(1, 2, 5, 5) if case == "position_bias" else True
    if case == "softcap":
        kwargs[case] = 30.0
        with pytest.raises(ValueError, match="softcap"):  # sdpa's own answer to it
            lane_attention(Module(), q, k, v, mask, **kwargs)
        return
    torch.manual_seed(3)
    got, _ = lane_attention(Module(), q, k, v, mask, **kwargs)
    torch.manual_seed(3)
    want, _ = sdpa_attention_forward(Module(), q, k, v, mask, **kwargs)
    assert drawn == [] and torch.equal(got, want)


def test_masks_follow_the_seed():
    q = k = v = torch.randn(2, 2, 16, 4)
    torch.manual_seed(5)
    first = ChunkedAttention.apply(q, k, v, None, dropped_lanes(0.5), 0.5)
    torch.manual_seed(5)
    assert torch.equal(ChunkedAttention.apply(q, k, v, None, dropped_lanes(0.5), 0.5), first)


def tiny_bert(attention_dropout: float, implementation: str = "sdpa"):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=attention_dropout)
    return BertForSequenceClassification._from_config(config, attn_implementation=implementation)


def batch():
    ids = torch.randint(1, 120, (3, 17), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 9:] = mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}


def test_a_bert_trains_as_with_eager_attention_and_the_same_masks(drawn, monkeypatch):
    """The model's own loss and gradients, against transformers' eager attention whose
    dropout is given the masks ChunkedAttention drew."""
    model = tiny_bert(0.25).train()
    assert use_lane_attention(model)
    loss = model(**batch()).loss
    ours = torch.autograd.grad(loss, list(model.parameters()))
    assert len(drawn) == 2  # one a layer: the whole batch is one chunk

    eager = tiny_bert(0.25, "eager").train()
    masks, keep_scale = iter(drawn), LANES / (LANES - dropped_lanes(0.25))
    import transformers.models.bert.modeling_bert as bert

    def dropout(x, p=0.5, training=True, inplace=False):  # the hidden ones have p 0
        return x * next(masks) * keep_scale if p and training else x
    monkeypatch.setattr(bert.nn.functional, "dropout", dropout)
    want_loss = eager(**batch()).loss
    torch.testing.assert_close(loss, want_loss)
    for got, want in zip(ours, torch.autograd.grad(want_loss, list(eager.parameters()))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_evaluation_and_bf16_autocast(drawn):
    model, sdpa = tiny_bert(0.1), tiny_bert(0.1)
    use_lane_attention(model)
    with torch.no_grad():  # evaluation: no dropout, transformers' sdpa, the same numbers
        assert torch.equal(model.eval()(**batch()).logits, sdpa.eval()(**batch()).logits)
    assert drawn == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.train()(**batch()).loss
    loss.backward()
    assert torch.isfinite(loss) and len(drawn) == 2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_only_sdpa_models_switch_and_checkpoints_do_not_carry_it(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from core.demo import tiny_llama_config
    assert not use_lane_attention(tiny_bert(0.1, "eager"))  # what the user chose stays
    assert not use_lane_attention(nn.Linear(2, 2))
    lora = get_peft_model(AutoModelForCausalLM.from_config(tiny_llama_config(300)),
                          LoraConfig(r=4, target_modules=["q_proj"]))
    assert use_lane_attention(lora)
    assert lora.get_base_model().config._attn_implementation == attention.NAME
    model = tiny_bert(0.1)
    use_lane_attention(model)
    model.save_pretrained(tmp_path)  # loadable where rawtune's function is not registered
    assert attention.NAME not in json.dumps(json.loads((tmp_path / "config.json").read_text()))


def test_a_model_of_several_towers_is_left_as_it_is():
    from transformers import CLIPConfig, CLIPModel
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=50),
                        vision_config=dict(small, image_size=8, patch_size=4), projection_dim=8)
    model = CLIPModel._from_config(config, attn_implementation="sdpa")
    assert not use_lane_attention(model)
    assert model.config._attn_implementation == "sdpa"
