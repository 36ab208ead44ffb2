"""Attention with dropout, a few examples at a time, for training on a CPU.

On a CPU, PyTorch's fused attention kernel (flash attention) has no dropout: an
`F.scaled_dot_product_attention` call with `dropout_p > 0` takes the unfused "math"
path, which materialises the scores, the softmax, the mask and the dropped
probabilities of the whole batch, [batch, heads, queries, keys] each, and reads them
back in the backward pass. At 256 tokens that is 50 MB a tensor for a MiniLM layer at
batch 16, far more than the cache, and the layer's attention takes 5x as long as
without dropout; profiled on the `cls-long` benchmark, attention with dropout was about
45 % of a training step, for Trainer and rawtune alike.

`ChunkedAttention` computes the same thing (softmax(q·kᵀ·scale + mask), dropped and
scaled by 1 / (1 - p), times v) for as many examples at a time as keep each tensor
near a few MiB, so it stays in cache. For the backward pass it keeps q, k, v, the
output and the dropout mask, a byte a score, and recomputes each chunk's
probabilities there, as flash attention does. A row with no key to attend to (a
padding row of a left-padded causal batch) averages every key, as transformers'
eager attention does, where SDPA gives zeros: it is padding either way. The dropout
masks come from 16-bit lanes of the random words (`core.dropout.lane_keep`), like
`LaneDropout`'s. Everything else (evaluation, a p of 0, another device, a mask that
is trained, attention with a position bias or a soft cap, or asked for its weights,
and attention of fewer scores than `core.dropout.LANES_FROM`, where a chunk's Python
costs more than it saves) goes to transformers' own `sdpa` function unchanged.

`use_lane_attention(model)` registers the function with transformers'
`AttentionInterface` and switches a model that uses `sdpa` to it (for good: the
model object keeps it after training; a saved config does not).
"""

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from core.dropout import dropped_lanes, drops_in_lanes, keep_scale, lane_keep, lanes_pay

NAME = "rawtune_lanes"  # the name under which transformers finds it
CHUNK_BYTES = 4 << 20  # one chunk's fp32 scores: a few MiB, so a chunk stays in cache


def _chunk_rows(q: torch.Tensor, k: torch.Tensor) -> int:
    """How many examples one chunk holds."""
    batch, heads, queries, _ = q.shape
    return max(1, min(batch, CHUNK_BYTES // (heads * queries * k.shape[2] * 4)))


def _probabilities(q, k, bias, scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias) in fp32, for one chunk."""
    scores = torch.matmul(q.float() * scale, k.float().transpose(-1, -2))
    if bias is not None:
        scores.add_(bias)
    return torch.softmax(scores, dim=-1)


class ChunkedAttention(torch.autograd.Function):
    """Attention with dropout, chunk by chunk of the batch; see the module's docstring.

    q, k, v: [batch, heads, length, head_dim]; bias: an additive fp32 mask that
    broadcasts to [batch, heads, queries, keys], or None; dropped: p in lanes.
    The scalings are applied to the [length, head_dim] factors, not to the larger
    [queries, keys] products."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # fp32, as SDPA's math
    def forward(ctx, q, k, v, bias, dropped: int, scale: float):
        out = torch.empty(*q.shape[:3], v.shape[-1], dtype=torch.float32, device=q.device)
        # 0 or 1 a byte: a product with a uint8 tensor is several times faster on a CPU
        # than masked_fill or a product with a bool one.
        keep = torch.empty(*q.shape[:3], k.shape[2], dtype=torch.uint8, device=q.device)
        rows = _chunk_rows(q, k)
        for start in range(0, q.shape[0], rows):
            part = slice(start, start + rows)
            probs = _probabilities(q[part], k[part], _rows(bias, part), scale)
            keep[part] = lane_keep(probs.shape, dropped, q.device).view(torch.uint8)
            torch.matmul(probs.mul_(keep[part]), v[part].float(), out=out[part])
        ctx.keep_scale, ctx.scale = keep_scale(dropped), scale
        out.mul_(ctx.keep_scale)
        ctx.save_for_backward(q, k, v, bias, keep, out)
        return out.to(q.dtype)

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out):
        q, k, v, bias, keep, out = ctx.saved_tensors
        grad_out = grad_out.float()
        grad_q, grad_k, grad_v = (torch.empty(t.shape, dtype=torch.float32, device=t.device)
                                  for t in (q, k, v))
        rows = _chunk_rows(q, k)
        for start in range(0, q.shape[0], rows):
            part = slice(start, start + rows)
            qf, kf, vf = q[part].float(), k[part].float(), v[part].float()
            probs = _probabilities(qf, kf, _rows(bias, part), ctx.scale)
            g = grad_out[part] * ctx.keep_scale
            torch.matmul((probs * keep[part]).transpose(-1, -2), g, out=grad_v[part])
            grad_probs = torch.matmul(g, vf.transpose(-1, -2)).mul_(keep[part])
            # The softmax's backward: each row's sum of probs·grad_probs is rowsum(g·out),
            # a product over head_dim instead of over every key (as flash attention does).
            row_dot = (grad_out[part] * out[part]).sum(-1, keepdim=True)
            grad_scores = grad_probs.sub_(row_dot).mul_(probs)
            torch.matmul(grad_scores, kf * ctx.scale, out=grad_q[part])
            torch.matmul(grad_scores.transpose(-1, -2), qf * ctx.scale, out=grad_k[part])
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None


def _rows(bias, part: slice):
    """The bias of a chunk's examples (a bias shared by the batch is kept whole)."""
    return bias if bias is None or bias.shape[0] == 1 else bias[part]


def _additive(mask, is_causal: bool, queries: int, keys: int, device) -> torch.Tensor | None:
    """SDPA's attention mask (boolean: True attends; or additive), or is_causal, which
    comes without one, as an additive fp32 bias; finite, as -inf would make a row
    with no key NaN."""
    lowest = torch.finfo(torch.float32).min
    if is_causal:  # upper-left aligned, as SDPA's is_causal
        above = torch.ones(queries, keys, dtype=torch.bool, device=device).triu_(1)
        return torch.zeros(1, 1, queries, keys, device=device).masked_fill_(above, lowest)
    if mask is None:
        return None
    if mask.shape[-2] > 1 and mask.stride(-2) == 0:
        mask = mask[..., :1, :]  # a padding mask expanded over the queries: keep one row
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill_(~mask, lowest)
    return mask.float().clamp(min=lowest)


def lane_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                   scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention interface: ChunkedAttention where there is dropout to draw
    on a CPU, transformers' `sdpa` function everywhere else."""
    trained_mask = attention_mask is not None and attention_mask.requires_grad
    unsupported = any(kwargs.get(name) is not None for name in ("position_bias", "softcap"))
    scores = query.shape[:3].numel() * key.shape[2]  # [batch, heads, queries] x keys
    if (not drops_in_lanes(dropout) or query.device.type != "cpu" or trained_mask or unsupported
            or kwargs.get("output_attentions") or not lanes_pay(scores)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    queries, keys = query.shape[2], key.shape[2]
    # As transformers' sdpa function decides it: causal only when no mask says otherwise.
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = queries > 1 and attention_mask is None and is_causal
    bias = _additive(attention_mask, is_causal, queries, keys, query.device)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = ChunkedAttention.apply(query, key, value, bias, dropped_lanes(dropout), scale)
    return out.transpose(1, 2).contiguous(), None


def use_lane_attention(model: nn.Module) -> bool:
    """Switch `model` (or a peft model's base) from `sdpa` to lane_attention; whether it was."""
    AttentionInterface.register(NAME, lane_attention)
    # The masks sdpa gets (boolean, or none where is_causal says it): without an entry
    # here, transformers builds no mask at all for an attention it does not know.
    AttentionMaskInterface.register(NAME, sdpa_mask)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # A model of several sub-models (vision and text towers) is left as it is: a name
    # set on it reaches every tower, including one the user kept on another attention.
    if (not isinstance(base, PreTrainedModel) or base.config._attn_implementation != "sdpa"
            or base.config.sub_configs):
        return False
    base.set_attn_implementation(NAME)
    return base.config._attn_implementation == NAME
