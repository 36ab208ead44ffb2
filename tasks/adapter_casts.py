"""peft's cast of each LoRA adapter's input to the adapters' dtype, off where autocast
makes it a round trip.

Over a bf16 (or fp16) base peft casts every adapter's input up to the adapters' fp32,
and autocast, which wraps every training and evaluation forward of a run in half
precision, casts it straight back down for the adapter's first product: for each
adapted layer two copies of the activation forward and two backward, each launched on
its own (182 adapted layers in OpenLLaMA-3b). Between the two casts there is only the
adapter's dropout, and a half-precision input leaves it the same where its scale is
applied in fp32 and its masks come from the same distribution:

- lane dropout (`core/dropout.py`, a CPU run's default): a Python float scale, the
  product rounded once, masks drawn without regard to the dtype: the same bits
  (tests/test_adapter_casts.py);
- torch's dropout on a GPU: its fused kernel scales in fp32, and draws its masks from
  fp32 uniforms, but other ones for a bf16 tensor than for an fp32 one: other draws of
  the same masks' distribution, as another seed would give;
- no dropout at all.

Elsewhere the cast stays: torch's dropout on a CPU (`--no-lane-dropout`) builds its
scale in the input's dtype (1/0.95 becomes 1.0547 in bf16, a 0.2 % bias), and under
`--compile` the compiled dropout draws its uniforms in the input's dtype, which moves
the keep probability by up to half a bf16 step. It stays too under `--fsdp` (no
autocast: its bf16 policy casts the weights instead) and for DoRA, whose weight norm
would be taken in bf16. Generation runs outside autocast, so it turns the cast back on
(`adapter_input_casts`, eval/generate.py).
"""

import contextlib

import torch

from core.dropout import drops_in_lanes, lane_dropout_runs


def cast_is_a_round_trip(cfg, device: torch.device) -> bool:
    """Whether a run's settings (a LoraRunConfig) make peft's input cast one that
    autocast undoes, the dropout between unchanged: the cases of the module's docstring."""
    if cfg.mixed_precision == "no" or cfg.fsdp or cfg.use_dora:
        return False
    if cfg.lora_dropout == 0:
        return True
    if lane_dropout_runs(cfg, device):  # the loop swaps peft's dropout for lanes
        return drops_in_lanes(cfg.lora_dropout)
    return device.type == "cuda" and not cfg.compile


def set_adapter_input_casts(model: torch.nn.Module, on: bool) -> list[torch.nn.Module]:
    """Switch peft's input cast on every adapted layer; the layers that changed."""
    layers = [m for m in model.modules()
              if getattr(m, "cast_input_dtype_enabled", on) is not on]
    for layer in layers:
        layer.cast_input_dtype_enabled = on
    return layers


@contextlib.contextmanager
def adapter_input_casts(model: torch.nn.Module):
    """peft's input casts on inside, for forward passes outside autocast; off again after
    where they were off."""
    layers = set_adapter_input_casts(model, True)
    try:
        yield
    finally:
        for layer in layers:
            layer.cast_input_dtype_enabled = False
