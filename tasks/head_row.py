"""The last encoder layer computed at the one position the classifier reads.

BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA and DistilBERT classify from the last layer's
first row alone (the [CLS] or <s> token: BERT's pooler, the RoBERTa-style heads and
DistilBERT's `pre_classifier` all take `hidden[:, 0]`). The transformers layer computes
every row all the same, and the head throws all but one away. In that last layer only the keys and values need every
position; the query, the attention output, the feed-forward block and the layer norms
are needed at the first position only. `first_row_only(model)` makes the last layer
compute just that: for MiniLM's 6 layers about a seventh of a training step's matrix
products. The logits are the same up to rounding, and so are the gradients
(tests/test_head_row.py compares both with the full layer's).

With dropout the arithmetic is the same but the draws are not: the last layer draws
masks for one row, so a run differs from `--no-head-row-only` at the same seed as
another seed would. The last layer's output is [batch, 1, hidden]. Where something may
read the other rows or the layer's attention (hidden states or attentions asked for),
where the layer is a decoder's (a cache, cross-attention), checkpointed, or on a
kernel other than eager, sdpa or rawtune's own, the layer runs as transformers wrote it.
Under --compile the last layer is a graph of its own, beside the one the others share.
"""

import sys
from functools import partial

import torch
from transformers import (BertForSequenceClassification, CamembertForSequenceClassification,
                          DistilBertForSequenceClassification, ElectraForSequenceClassification,
                          RobertaForSequenceClassification, XLMRobertaForSequenceClassification)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from core.attention import NAME as LANES

KERNELS = ("eager", "sdpa", LANES)  # kernels that take one query row against all keys


def _whole_layer(layer, attn, kwargs) -> bool:
    """Whether this call must run the layer as transformers wrote it (module docstring)."""
    config = attn.config
    return (config._attn_implementation not in KERNELS or layer.gradient_checkpointing
            or kwargs.get("cache") is not None
            or any(kwargs.get(name) or getattr(config, name, False)
                   for name in ("output_attentions", "output_hidden_states")))


def _first_row_attention(attn, q_proj, k_proj, v_proj, hidden, mask, default):
    """The first position's self-attention output over all positions: [batch, 1, hidden];
    `default`: the model's own eager attention, for the kernel named "eager"."""
    batch, size = hidden.shape[0], attn.attention_head_size

    def heads(x):  # [batch, rows, hidden] -> [batch, heads, rows, head_size]
        return x.view(batch, x.shape[1], -1, size).transpose(1, 2)

    query = heads(q_proj(hidden[:, :1]))
    key, value = heads(k_proj(hidden)), heads(v_proj(hidden))
    if mask is not None and mask.dim() == 4:  # [batch, 1, queries, keys]: keep the first row
        mask = mask[:, :, :1]
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, default)
    out, _ = attend(attn, query, key, value, mask, scaling=attn.scaling,
                    dropout=attn.dropout.p if attn.training else 0.0)
    return out.reshape(batch, 1, -1)


def _bert_layer(layer, eager, hidden_states: torch.Tensor, attention_mask=None, *args,
                **kwargs):
    """BertLayer's forward (and its copies': RoBERTa, ELECTRA...) at the first position.
    `args`: the encoder's states BertEncoder passes by position, None in an encoder (a
    decoder is never patched)."""
    attn = layer.attention.self
    if _whole_layer(layer, attn, kwargs):
        return type(layer).forward(layer, hidden_states, attention_mask, *args, **kwargs)
    out = _first_row_attention(attn, attn.query, attn.key, attn.value, hidden_states,
                               attention_mask, eager)
    attention_output = layer.attention.output(out, hidden_states[:, :1])
    return layer.feed_forward_chunk(attention_output)


def _distilbert_block(block, eager, hidden_states: torch.Tensor, attention_mask=None,
                      **kwargs):
    """DistilBERT's TransformerBlock forward at the first position."""
    attn = block.attention
    if _whole_layer(block, attn, kwargs):
        return type(block).forward(block, hidden_states, attention_mask, **kwargs)
    out = _first_row_attention(attn, attn.q_lin, attn.k_lin, attn.v_lin, hidden_states,
                               attention_mask, eager)
    attention_output = block.sa_layer_norm(attn.out_lin(out) + hidden_states[:, :1])
    # ff_chunk, not ffn: the feed-forward's chunking over positions has one row to split.
    ffn_output = block.ffn.ff_chunk(attention_output)
    return block.output_layer_norm(ffn_output + attention_output)


# The classifiers known to read the first row only, the name of their layers' stack in
# the model's body, and the forward for its last layer.
FAMILIES = {BertForSequenceClassification: ("encoder", _bert_layer),
            RobertaForSequenceClassification: ("encoder", _bert_layer),
            XLMRobertaForSequenceClassification: ("encoder", _bert_layer),
            CamembertForSequenceClassification: ("encoder", _bert_layer),
            ElectraForSequenceClassification: ("encoder", _bert_layer),
            DistilBertForSequenceClassification: ("transformer", _distilbert_block)}


def first_row_only(model: torch.nn.Module) -> bool:
    """Make the last layer of a known classifier compute its first row alone (in place, a
    peft model's base included); whether it did. Other models are left as they are."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = next((f for cls, f in FAMILIES.items() if type(base) is cls), None)
    if family is None or base.config._attn_implementation not in KERNELS:
        return False
    stack, forward = family
    layers = getattr(base.base_model, stack).layer
    if getattr(base.config, "is_decoder", False) or not layers:
        return False
    eager = sys.modules[type(base).__module__].eager_attention_forward  # the family's own
    # A partial, not a bound method: it pickles and deep-copies with the model.
    layers[-1].forward = partial(forward, layers[-1], eager)
    return True
