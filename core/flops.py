"""Model FLOPs of a training step, and model FLOP utilisation (MFU).

MFU is the share of the accelerator's peak that goes into the model's own
arithmetic. It counts what the model must compute, not what the kernels happen to
do (padding, recomputation and attention masks earn nothing), so it compares
runs, libraries and machines on equal terms. By the same rule, work a run skips
because nothing reads it is counted as if done: a classifier's last layer at every
row (tasks/head_row.py computes one), the LM head at every position. MFU is then the
standard model's FLOPs per second over the peak, which another library's figure can
be set beside.
"""

import re

import torch
from transformers.pytorch_utils import Conv1D

# Dense bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets. A GPU matches the
# first entry whose words all appear in torch.cuda.get_device_name(), split at spaces
# and dashes ("NVIDIA H100 PCIe" before "H100"; "L4" does not match "NVIDIA L40").
BF16_PEAK_TFLOPS = ((("H200",), 989.0), (("H100", "PCIe"), 756.0), (("H100", "NVL"), 835.0),
                    (("H100",), 989.0), (("A100",), 312.0), (("L40S",), 362.0),
                    (("L4",), 121.0), (("A10",), 125.0))


# Layers that multiply each vector by a weight matrix: transformers' Conv1D (GPT-2 and its
# kin) is a Linear whose weight is stored transposed, so it costs the same per entry.
MATMUL_LAYERS = (torch.nn.Linear, Conv1D)

# Linear layers under these names see one vector per example, not one per token:
# a sequence classifier's pooler and head (BERT, DistilBERT, Llama and GPT-2 classifiers).
PER_EXAMPLE_MODULES = {"pooler", "pre_classifier", "classifier", "score"}


class StepFlops:
    """Training FLOPs of a batch: `per_token * tokens + per_example * examples +
    per_token_pair * token_pairs`, counting real tokens only.

    Matrix products: a weight of N entries costs 2N per vector forward and 2N backward
    for the input's gradient; only a trained weight costs another 2N for its own
    gradient (LoRA's frozen base does not). So `4 * N + 2 * N_trained` per vector, over
    the Linear (and Conv1D) layers, per token except in a classifier's head (per example).
    Attention's scores and weighted sum add `12 * layers * width` per pair of tokens of
    one example (the PaLM paper's count; causal masking is not discounted).
    """

    def __init__(self, model: torch.nn.Module):
        self.per_token = self.per_example = 0
        for name, module in model.named_modules():
            if isinstance(module, MATMUL_LAYERS):
                w = module.weight
                cost = 4 * w.numel() + 2 * w.numel() * w.requires_grad
                if PER_EXAMPLE_MODULES & set(name.split(".")):
                    self.per_example += cost
                else:
                    self.per_token += cost
        config = getattr(model, "config", None)
        layers = _first(config, "num_hidden_layers", "n_layers", "n_layer")
        width = _first(config, "hidden_size", "dim", "n_embd")
        self.per_token_pair = 12 * layers * width if layers and width else 0

    def __call__(self, tokens: float, examples: float, token_pairs: float) -> float:
        """FLOPs of a batch of `examples` holding `tokens` real tokens, `token_pairs` =
        the sum over its examples of length**2."""
        return (self.per_token * tokens + self.per_example * examples
                + self.per_token_pair * token_pairs)


def _first(config, *names: str) -> int | None:
    return next((getattr(config, n) for n in names if getattr(config, n, None)), None)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    """The peak MFU is measured against: `given`, else a known GPU's dense bf16 peak."""
    if given or device.type != "cuda":
        return given
    words = set(re.split(r"[\s-]+", torch.cuda.get_device_name(device)))
    return next((peak for keys, peak in BF16_PEAK_TFLOPS if words.issuperset(keys)), None)
