"""Each LoRA adapter's product added to the frozen layer's output inside one matrix
product.

peft adds an adapter as `result + lora_B(lora_A(dropout(x))) * scaling`. Each of the
three operations after the small product h = lora_A(dropout(x)) makes a pass over a
[tokens, out_features] tensor: B's product writes one, the scaling reads it and
writes another, the sum reads two and writes a third; backward, the scaling is one
more pass over the gradient. `torch.addmm(result, h, B.T, alpha=scaling)` is the
same sum in one operation: the matrix library scales the product as it accumulates
it and adds `result` as it writes. Backward, the gradient reaching `result` is the
incoming one, unchanged, and the scaling falls on the two small products' gradients
([tokens, r] and [r, out_features]). The arithmetic is the same, rounded once where
peft rounds three times (tests/test_adapter_product.py).

Only vanilla adapters on a `torch.nn.Linear` base take this path, and only where
`addmm` takes the operands as they are: under autocast, which casts all three to its
dtype as it does B's own product, or outside it with one dtype throughout (not, say,
a bf16 base's output and an fp32 adapter in generation, where peft's sum promotes).
Elsewhere the layer runs peft's forward: adapters disabled or merged, adapter names
per row, variants (DoRA, aLoRA), a bias on B, and the quantised layers of QLoRA,
which are other classes.
"""

from functools import partial

import torch
from peft.tuners.lora.layer import Linear as LoraLinear


def _vanilla(layer: LoraLinear, x: torch.Tensor, kwargs: dict) -> bool:
    """Whether this call adds vanilla adapters only, to an output addmm can take as a
    matrix (the cases of the module docstring)."""
    return not (kwargs or x.dim() < 2 or layer.disable_adapters or layer.merged
                or any(name in layer.lora_variant or layer.lora_B[name].bias is not None
                       for name in layer.active_adapters if name in layer.lora_A))


def _forward(layer: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoRA Linear forward, each adapter added in the product of its B."""
    if not _vanilla(layer, x, kwargs):
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x, *args)
    dtype, autocast = result.dtype, torch.is_autocast_enabled(x.device.type)
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        x = layer._cast_input_dtype(x, lora_a.weight.dtype)
        h = lora_a(layer.lora_dropout[name](x))
        if autocast or result.dtype == h.dtype == lora_b.weight.dtype:
            flat = torch.addmm(result.flatten(0, -2), h.flatten(0, -2), lora_b.weight.t(),
                               alpha=layer.scaling[name])
            result = flat.view(result.shape)
        else:  # mixed dtypes outside autocast: peft's sum, which promotes
            result = result + lora_b(h) * layer.scaling[name]
    return result.to(dtype)


def adapters_in_one_product(model: torch.nn.Module) -> int:
    """Give every LoRA Linear layer of a peft model the forward above (in place); how many."""
    layers = [m for m in model.modules() if type(m) is LoraLinear]
    for layer in layers:
        # A partial, not a bound method: it pickles and deep-copies with the model.
        layer.forward = partial(_forward, layer)
    return len(layers)
