"""Lanes only where they pay: below core.dropout.LANES_FROM elements (attention: scores),
dropout is torch's own and attention transformers' sdpa, draw for draw."""

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from core.attention import lane_attention
from core.dropout import LANES_FROM, LaneDropout, lane_keep


def test_a_tensor_below_the_threshold_gets_torch_s_dropout():
    x = torch.randn(LANES_FROM - 1, requires_grad=True)
    torch.manual_seed(0)
    got = LaneDropout(0.1).train()(x)
    got.backward(torch.ones_like(got))
    torch.manual_seed(0)
    want = nn.functional.dropout(x.detach(), 0.1, training=True)
    assert torch.equal(got, want)
    assert torch.equal(x.grad, (want != 0) / 0.9)  # torch's mask and scale, backward too


def test_from_the_threshold_the_masks_come_from_lanes():
    x = torch.randn(LANES_FROM)
    dropout = LaneDropout(0.1).train()
    torch.manual_seed(0)
    got = dropout(x)
    torch.manual_seed(0)
    keep = lane_keep(x.shape, dropout.dropped, x.device)
    assert torch.equal(got, torch.where(keep, x * dropout.scale, 0))


@pytest.mark.parametrize("length, lanes", [(31, False), (32, True)])
def test_attention_goes_to_lanes_from_the_threshold_of_scores(length, lanes, drawn):
    # 8 rows x 4 heads x length queries x length keys: 32 tokens make LANES_FROM scores.
    assert 8 * 4 * 32 * 32 == LANES_FROM

    class Module(nn.Module):
        num_key_value_groups, is_causal = 1, False
    q, k, v = (torch.randn(8, 4, length, 8) for _ in range(3))
    mask = torch.ones(8, 1, 1, length, dtype=torch.bool)
    mask[::3, ..., length // 2:] = False  # every third row half padding
    torch.manual_seed(1)
    got, _ = lane_attention(Module(), q, k, v, mask, dropout=0.1)
    assert bool(drawn) == lanes
    if not lanes:
        torch.manual_seed(1)
        want, _ = sdpa_attention_forward(Module(), q, k, v, mask, dropout=0.1)
        assert torch.equal(got, want)
