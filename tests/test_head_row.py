"""The last layer at the first row only gives the full model's logits and gradients."""

import copy
import json

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, CamembertConfig,
                          CamembertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, ElectraConfig,
                          ElectraForSequenceClassification, LlamaConfig,
                          LlamaForSequenceClassification, RobertaConfig,
                          RobertaForSequenceClassification, XLMRobertaConfig,
                          XLMRobertaForSequenceClassification)

import train_cls
from core.attention import use_lane_attention
from core.dropout import LANES, dropped_lanes
from tasks.head_row import first_row_only

pytestmark = pytest.mark.usefixtures("one_thread", "lanes_at_every_size")
VOCAB, LAYERS = 120, 3
SIZES = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
             intermediate_size=64, vocab_size=VOCAB)


def tiny(family: str, implementation: str = "sdpa", dropout: float = 0.0, **extra):
    """Attention dropout as given, no other; `extra`: config settings."""
    torch.manual_seed(0)
    if family == "distilbert":
        config = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=LAYERS, n_heads=4,
                                  hidden_dim=64, dropout=0.0, attention_dropout=dropout,
                                  seq_classif_dropout=0.0, **extra)
        return DistilBertForSequenceClassification._from_config(
            config, attn_implementation=implementation)
    kind, model = {"bert": (BertConfig, BertForSequenceClassification),
                   "roberta": (RobertaConfig, RobertaForSequenceClassification),
                   "xlm-roberta": (XLMRobertaConfig, XLMRobertaForSequenceClassification),
                   "camembert": (CamembertConfig, CamembertForSequenceClassification),
                   "electra": (ElectraConfig, ElectraForSequenceClassification)}[family]
    if family == "electra":
        extra["embedding_size"] = 16  # projected up to the hidden size, as ELECTRA does
    config = kind(**SIZES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=dropout,
                  pad_token_id=0, **extra)
    return model._from_config(config, attn_implementation=implementation)


def last_layer(model):
    base = model.base_model
    return (base.transformer if hasattr(base, "transformer") else base.encoder).layer[-1]


def batch(family: str) -> dict[str, torch.Tensor]:
    """Three rows, two of them padded; BERT's rows are sentence pairs."""
    ids = torch.randint(3, VOCAB, (3, 17), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 9:] = mask[2, 4:] = 0
    out = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask,
           "labels": torch.tensor([0, 1, 1])}
    if family == "bert":
        out["token_type_ids"] = (torch.arange(17) >= 6).long().expand(3, 17) * mask
    return out


def loss_and_grads(model, inputs):
    out = model(**inputs)
    return out.logits, out.loss, torch.autograd.grad(out.loss, list(model.parameters()))


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "camembert", "electra",
                                    "distilbert"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_logits_and_gradients_are_the_full_models(family, implementation):
    # DistilBERT's feed-forward in chunks of 17 positions (the batch's length, which the
    # chunk must divide): the first row alone is not split.
    extra = {"chunk_size_feed_forward": 17} if family == "distilbert" else {}
    full = tiny(family, implementation, **extra).train()
    ours = copy.deepcopy(full)
    assert first_row_only(ours)
    inputs = batch(family)
    got, want = loss_and_grads(ours, inputs), loss_and_grads(full, inputs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    for (name, _), g, w in zip(full.named_parameters(), got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)
    # The last layer computed one row: its output is [batch, 1, hidden].
    shapes = []
    last_layer(ours).register_forward_hook(lambda module, args, out: shapes.append(out.shape))
    with torch.no_grad():
        assert torch.allclose(ours.eval()(**inputs).logits, full.eval()(**inputs).logits,
                              rtol=1e-5, atol=1e-6)
    assert shapes == [torch.Size([3, 1, 32])]


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_evaluation_draws_no_attention_dropout(family):
    full = tiny(family, dropout=0.5).eval()
    ours = copy.deepcopy(full)
    assert first_row_only(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch(family)).logits, full(**batch(family)).logits,
                                   rtol=1e-5, atol=1e-6)


def test_a_model_deep_copies_and_pickles_with_it():
    import pickle
    model = tiny("bert")
    assert first_row_only(model)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        layer = last_layer(other)
        assert layer.forward.args[0] is layer  # the copy's layer, not the original's
        torch.testing.assert_close(other.eval()(**batch("bert")).logits,
                                   model.eval()(**batch("bert")).logits)


@pytest.mark.parametrize("case", ["output_attentions", "output_hidden_states",
                                  "checkpointing", "flex_after"])
def test_what_may_read_other_rows_gets_the_whole_layer(case):
    """Asked for attentions or hidden states, checkpointed, or switched to a kernel the
    first row does not run on after the patch: the layer as transformers wrote it."""
    full = tiny("bert").train()
    ours = copy.deepcopy(full)
    assert first_row_only(ours)
    kwargs = {case: True} if case.startswith("output") else {}
    if case == "checkpointing":
        for model in (ours, full):
            model.gradient_checkpointing_enable({"use_reentrant": False})
    if case == "flex_after":
        for model in (ours, full):
            model.set_attn_implementation("flex_attention")
    shapes = []
    last_layer(ours).register_forward_hook(lambda module, args, out: shapes.append(out.shape))
    with torch.set_grad_enabled(case != "flex_after"):  # flex attention: no CPU backward
        got, want = ours(**batch("bert"), **kwargs), full(**batch("bert"), **kwargs)
    assert shapes == [torch.Size([3, 17, 32])]
    torch.testing.assert_close(got.logits, want.logits)
    if case.startswith("output"):
        assert len(getattr(got, case[7:])) == len(getattr(want, case[7:]))


def test_attention_dropout_in_lanes_draws_the_first_rows_masks(drawn, monkeypatch):
    """Training on a CPU: rawtune's chunked attention with dropout, one query row in the
    last layer, against the full eager model given the masks it drew (other rows: kept)."""
    ours = tiny("bert", dropout=0.25).train()
    assert use_lane_attention(ours) and first_row_only(ours)
    _, loss, grads = loss_and_grads(ours, batch("bert"))
    assert [m.shape[2] for m in drawn] == [17] * (LAYERS - 1) + [1]

    import transformers.models.bert.modeling_bert as bert
    masks, keep_scale = iter(drawn), LANES / (LANES - dropped_lanes(0.25))

    def dropout(x, p=0.5, training=True, inplace=False):
        if not (p and training):
            return x
        keep = next(masks)
        full = torch.ones(x.shape, dtype=keep.dtype)
        full[:, :, :keep.shape[2]] = keep  # the rows the head does not read: anything
        return x * full * keep_scale
    monkeypatch.setattr(bert.nn.functional, "dropout", dropout)
    _, want_loss, want = loss_and_grads(tiny("bert", "eager", 0.25).train(), batch("bert"))
    torch.testing.assert_close(loss, want_loss)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_models_whose_head_reads_other_rows_are_left_as_they_are():
    llama = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, pad_token_id=0))  # reads each row's last real token
    decoder = BertForSequenceClassification(BertConfig(**SIZES, is_decoder=True))
    for model in (llama, decoder):
        assert not first_row_only(model)
        assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("applies", [True, False])
def test_train_cls_uses_it_unless_told_not_to(monkeypatch, tmp_path, applies):
    """config.json records whether it ran: not for a model it leaves alone."""
    calls = []
    monkeypatch.setattr(train_cls, "first_row_only", lambda model: calls.append(model) or applies)
    common = ["--demo", "--max-steps", "1", "--max-train-samples", "32", "--batch-size", "8"]
    for out, flags in (("on", []), ("off", ["--no-head-row-only"])):
        assert train_cls.main([*common, "--output-dir", str(tmp_path / out), *flags]) == 0
        kept = json.loads((tmp_path / out / "config.json").read_text())
        assert kept["head_row_only"] is (applies and out == "on")
    assert len(calls) == 1 and isinstance(calls[0], DistilBertForSequenceClassification)

