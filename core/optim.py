"""AdamW with decoupled weight decay, and the linear warmup-then-decay schedule.

Both are written out rather than pulled from a helper so that a reader sees the
two decisions that matter: which parameters are decayed, and what the learning
rate is at every step.
"""

import math
from contextlib import contextmanager
from typing import Iterator

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices are decayed; biases and norm weights (1-D tensors) are not.

    Decaying a bias or a LayerNorm gain only pulls it towards zero, which is not the
    regularisation weight decay is meant to give, so they get none. Frozen
    parameters (LoRA's base weights) are left out: the optimizer never sees them.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: torch.nn.Module, lr: float, weight_decay: float,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    # The fused kernel updates every parameter in one launch; it exists for CUDA
    # and CPU tensors, which is where our parameters live.
    device = next(p for p in model.parameters() if p.requires_grad).device
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=device.type in ("cuda", "cpu"))


def clip_gradients(accelerator, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients to a total norm of `max_norm` where it is above; return the
    norm before clipping.

    torch's `clip_grad_norm_` multiplies every gradient by min(1, max_norm / norm) even
    when that is 1, so that a GPU never waits to read the norm. On a CPU the read costs
    nothing, while the multiply is a pass over every gradient: 4 ms of a MiniLM step,
    where most steps' norms are under 1 on SST-2. There it is left out when the factor
    is 1, which leaves every gradient exactly as the multiply by 1.0 would. GPU runs
    and sharded weights (--fsdp: DTensors, whose norm is a collective) keep Accelerate's
    path.
    """
    from torch.distributed.tensor import DTensor
    if accelerator.device.type != "cpu" or any(isinstance(p, DTensor) for p in params):
        return accelerator.clip_grad_norm_(params, max_norm)
    accelerator.unscale_gradients()  # an fp16 run's scaled gradients; else nothing
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    factor = max_norm / (norm + 1e-6)  # torch's, before its cap at 1
    if not factor >= 1:  # under 1, or NaN, which torch's multiply spreads to every gradient
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def warmup_steps_for(total_steps: int, warmup_ratio: float, warmup_steps: int | None) -> int:
    if warmup_steps is not None:
        return warmup_steps
    return math.ceil(total_steps * warmup_ratio)


def lr_factor(step: int | torch.Tensor, warmup: int, total: int) -> torch.Tensor:
    """Multiplier on the peak lr for optimizer step `step` (0-based), as a float64 tensor.

    It rises linearly from 0 over `warmup` steps, so Adam's early, noisy second-moment
    estimates meet small updates, then falls linearly to 0 at `total`, so the last
    updates are the gentlest. `step` may be a count kept on the device (the loop's count
    of applied steps): the factor is then computed there, and the host does not wait.
    """
    step = torch.as_tensor(step, dtype=torch.float64)
    warming = step / max(1, warmup)
    decaying = ((total - step) / max(1, total - warmup)).clamp(min=0.0)
    return torch.where(step < warmup, warming, decaying)


@contextmanager
def set_lr(optimizer: torch.optim.Optimizer, lr: torch.Tensor) -> Iterator[None]:
    """Every group's lr is `lr` for the optimizer steps taken inside.

    The fused AdamW reads a tensor lr where it lives, so an lr computed on the device
    costs no wait (its CUDA kernel wants it in fp32); other optimizers take a number,
    read back. Outside, the groups keep the number they had: a saved optimizer state
    holds no tensor lr, and the loop gives every step its own lr anyway.
    """
    value = lr.float() if optimizer.defaults.get("fused") else float(lr)
    before = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = value
    try:
        yield
    finally:
        for group, number in zip(optimizer.param_groups, before):
            group["lr"] = number
