"""What fits where: the memory of a LoRA run on a Llama, from a stated formula.

    python -m bench.fits            # README's table: OpenLLaMA-3b and a 7B Llama, batch 8 x 512

A Llama of hidden size h, MLP width m, L blocks, vocabulary V (untied output layer),
LoRA of rank r on all seven projections of every block, T = batch x length tokens
per device and step:

    P_lin = L (4h^2 + 3hm)              weights of the blocks' Linear layers
    P_emb = 2Vh + (2L + 1)h             embeddings, output layer and norms

base   fp32: 4 bytes per weight; bf16/fp16: 2. Quantised bases hold P_lin in
       8-bit: 1 byte per weight and a 4-byte scale per output row, or
       4-bit NF4: 1/2 byte per weight, a 1-byte block scale per 64 weights and a
       4-byte scale per 256 blocks (double quantisation),
       and P_emb in fp32: peft's k-bit preparation upcasts it (tasks/quantize.py).
LoRA   N = L r (11h + 3m) weights, 16 bytes each: fp32 weight, gradient, 2 AdamW moments.
activations
       without checkpointing  T (L k h + 12 V) bytes;
       with checkpointing     T (L c h + k h + 12 V) bytes, and for an 8-bit base also
                              T L (3h + m) 4 bytes,
       where k h is what one block keeps per token for the backward pass (k measured on
       CPU by `python -m bench.memory`: see ACTIVATION_K), c h a block's input kept under
       checkpointing (c = 4 bytes where the residual stream is fp32: fp32 and quantised
       bases; 2 for a bf16/fp16 base), and 12 V the logits (in the compute dtype, their
       fp32 copy for the loss, and the loss's gradient). The logits and the recomputed
       block do not peak together, so with checkpointing this overestimates (on CPU by
       3 % for 4-bit to 35 % for bf16). 8-bit layers keep their inputs (3h + m per
       block, taken as fp32) on bitsandbytes' autograd context, where non-reentrant
       checkpointing cannot free them; that term came out 9 % short on CPU.
A GPU also holds the CUDA context and allocator slack, outside these figures: a run is
counted as fitting a card of G GB when the estimate stays under G - 1.5 GiB.
"""

import argparse

# k of the formula, bytes per token per block per unit of h, measured by bench.memory on
# CPU (2026-11-27, llama-1024x8, batch 4 x 256, no checkpointing: (activations - 12 V T)
# / (T L h)): fp32 runs; bf16/fp16 bases computing in half precision; quantised bases
# computing in bf16, whose residual stream, norms and quantised layers' outputs are fp32
# (peft's preparation upcasts the embeddings) and whose LoRA inputs peft casts to fp32.
ACTIVATION_K = {"fp32": 129, "half": 85, "8bit": 123, "4bit": 112}
MODELS = {
    "OpenLLaMA-3b": dict(h=3200, m=8640, L=26, V=32000),
    "Llama 7B": dict(h=4096, m=11008, L=32, V=32000),
}
CARDS_GB = [16, 24, 40, 80]
SLACK_GIB = 1.5


def kind(base: str) -> str:
    """Which activation constant a base precision takes (see ACTIVATION_K)."""
    return "half" if base in ("bf16", "fp16") else base


def base_bytes(shape: dict, base: str) -> float:
    h, m, L, V = shape["h"], shape["m"], shape["L"], shape["V"]
    linear = L * (4 * h * h + 3 * h * m)
    other = 2 * V * h + (2 * L + 1) * h
    if base in ("fp32", "bf16", "fp16"):
        return (4 if base == "fp32" else 2) * (linear + other)
    rows = L * (4 * h + 2 * m + h)  # output rows of q, k, v, o, gate, up; down's are h
    quantised = linear + 4 * rows if base == "8bit" else linear * (0.5 + 1 / 64 + 4 / (64 * 256))
    return quantised + 4 * other


def lora_params(shape: dict, r: int) -> int:
    return shape["L"] * r * (11 * shape["h"] + 3 * shape["m"])


def activation_bytes(shape: dict, base: str, tokens: int, checkpointing: bool) -> float:
    h, L, V = shape["h"], shape["L"], shape["V"]
    block = ACTIVATION_K[kind(base)] * h
    logits = 12 * V
    if not checkpointing:
        return tokens * (L * block + logits)
    residual = 2 if base in ("bf16", "fp16") else 4
    kept_inputs = 4 * (3 * h + shape["m"]) if base == "8bit" else 0
    return tokens * (L * (residual * h + kept_inputs) + block + logits)


def estimate(shape: dict, base: str, r: int, tokens: int, checkpointing: bool) -> dict:
    """Bytes of the base, the LoRA state and the activations, and their sum."""
    parts = {"base": base_bytes(shape, base), "lora": 16 * lora_params(shape, r),
             "activations": activation_bytes(shape, base, tokens, checkpointing)}
    return {**parts, "total": sum(parts.values())}


def table(r: int, batch: int, length: int) -> str:
    """The README's table: GB per part, and on which cards the run fits."""
    lines = ["| model | base | checkpointing | base | LoRA state | activations | total | "
             + " | ".join(f"{g} GB" for g in CARDS_GB) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(CARDS_GB)]
    for name, shape in MODELS.items():
        for base in ("fp32", "bf16", "8bit", "4bit"):
            for ckpt in (False, True):
                e = {k: v / 1e9 for k, v in estimate(shape, base, r, batch * length,
                                                     ckpt).items()}
                fits = ["yes" if e["total"] * 1e9 < g * 1e9 - SLACK_GIB * 2**30 else "no"
                        for g in CARDS_GB]
                label = "bf16 / fp16" if base == "bf16" else base.replace("bit", "-bit")
                lines.append(f"| {name} | {label} | {'on' if ckpt else 'off'} | "
                             f"{e['base']:.1f} | {e['lora']:.2f} | {e['activations']:.1f} | "
                             f"{e['total']:.1f} | " + " | ".join(fits) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (train_lora.py's default)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args(argv)
    print(table(args.r, args.batch_size, args.max_length), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
