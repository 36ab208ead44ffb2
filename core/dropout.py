"""Dropout masks from a quarter of the random draws, for training on a CPU.

On a CPU, `nn.Dropout` draws one random number per element from the generator, one
element at a time, and that draw can cost more than the layer it follows: profiled
on the LoRA benchmark, the Bernoulli masks of LoRA's dropout took about a quarter of
a training step, for Trainer and rawtune alike. A mask needs far fewer random bits
than that. `LaneDropout` cuts each 64-bit random word into four 16-bit lanes, one
lane an element, and keeps an element when its lane is at or above p's share of the
65,536 lane values: masks of the same Bernoulli distribution (other draws, so a seed
gives other masks than nn.Dropout's), with p rounded to a multiple of 1/65536 (0.05
becomes 0.050003) and the kept elements scaled by 1 / (1 - that p), so every element
keeps its expected value. The words come from torch's default generator, so `--seed`
and a checkpoint's saved generator state make the masks repeat run after run.

On a GPU, torch's dropout is already one fused kernel with its own generator; there,
and under --compile (whose kernels fuse the draws too), `nn.Dropout` stays. So does
torch's dropout on a tensor of fewer than LANES_FROM elements, where the lanes lose:
their forward and backward are Python (an autograd Function), a fixed cost a call that
the draws they save on a small tensor do not repay.
"""

import torch
from torch import nn
from torch.autograd.function import once_differentiable

LANES = 65536  # the values of one 16-bit lane
# Below this many elements (or attention scores) a tensor keeps torch's own dropout.
# Measured in whole training steps of the cls-tiny benchmark (width 64, most of its
# dropouts and attentions under 32k elements), lanes on every tensor cost 6-11 % of a
# step against none; with this threshold, nothing. On MiniLM (cls-short) and the LoRA
# workloads, whose tensors are larger, it changes nothing (docs/benchmarks.md).
LANES_FROM = 1 << 15


def dropped_lanes(p: float) -> int:
    """How many of a lane's values drop an element: p rounded to a multiple of 1/LANES."""
    return round(p * LANES)


def drops_in_lanes(p: float) -> bool:
    """Whether lanes can draw a dropout of p: one they round to neither 0 nor 1."""
    return 0 < dropped_lanes(p) < LANES


def lanes_pay(numel: int) -> bool:
    """Whether drawing a tensor's masks from lanes pays: at LANES_FROM elements or more."""
    return numel >= LANES_FROM


def keep_scale(dropped: int) -> float:
    """1 / (1 - p) for the p lanes draw, so a kept element keeps its expected value."""
    return LANES / (LANES - dropped)


def lane_keep(shape: torch.Size, dropped: int, device: torch.device) -> torch.Tensor:
    """A boolean keep-mask of `shape`: each element kept unless its 16-bit lane is one of
    the `dropped` lowest of the LANES values."""
    numel = shape.numel()
    # Four 16-bit lanes a word: view the words as int16, whose values run -32768..32767.
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    lanes = words.random_(-2**63, None).view(torch.int16)[:numel].view(shape)
    return lanes >= dropped - LANES // 2


class KeptScaled(torch.autograd.Function):
    """x · keep · scale, keep a tensor of 0/1 bytes; its backward, the same product of the
    gradient. One pass over the elements each way, where `where(keep, x * scale, 0)`
    took two, and a product with bytes is several times faster on a CPU than a select
    or a product with booleans: the same values (x · scale, rounded once), a fifth less
    time for a LoRA-sized dropout in fp32. As in nn.Dropout, a dropped inf or NaN
    gives NaN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.addcmul(x.new_zeros(()), x, keep, value=scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        keep, = ctx.saved_tensors
        return torch.addcmul(grad.new_zeros(()), grad, keep, value=ctx.scale), None, None


class LaneDropout(nn.Module):
    """`nn.Dropout(p)` with masks cut from 64-bit random words, 16 bits an element, on
    tensors large enough for that to pay; torch's dropout of p on smaller ones."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.dropped = dropped_lanes(p)
        if not 0 <= self.dropped < LANES:
            raise ValueError(f"LaneDropout needs 0 <= p < 1 - 1/{2 * LANES}, got {p}")
        self.scale = keep_scale(self.dropped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropped == 0:
            return x
        if not lanes_pay(x.numel()):
            return nn.functional.dropout(x, self.p, training=True)
        keep = lane_keep(x.shape, self.dropped, x.device).view(torch.uint8)
        return KeptScaled.apply(x, keep, self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def lane_dropout_runs(cfg, device: torch.device) -> bool:
    """Whether a run (a TrainConfig) swaps its dropout for lanes: on a CPU, with
    --lane-dropout, without --compile (whose kernels fuse the draws)."""
    return device.type == "cpu" and cfg.lane_dropout and not cfg.compile


def use_lane_dropout(model: nn.Module) -> int:
    """Swap each `nn.Dropout` of `model` for a LaneDropout of its p; how many were swapped.

    Left as they are: dropout applied as a function inside a layer (attention dropout:
    `core.attention` draws sdpa's from lanes), an in-place one (its caller may rely on
    the input changing), and a p that lanes would round to 0 or 1 (below 1/131072 or
    that close to 1).
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout and not child.inplace and drops_in_lanes(child.p):
                setattr(parent, name, LaneDropout(child.p))
                swapped += 1
    return swapped
