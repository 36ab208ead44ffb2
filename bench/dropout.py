"""What LoRA's dropout costs a CPU training step, torch's masks against lane masks.

    python -m bench.dropout                     # fp32 and bf16, 8 x 256 tokens
    python -m bench.dropout --steps 30 --length 512

Two copies of the `lora` workload's model (the Llama of hidden 256 x 4 layers, LoRA
r 16 with dropout 0.05 on all seven projections), one with `nn.Dropout`, one with
`core.dropout.LaneDropout`, take forward-and-backward steps on one fixed batch in
turns (torch, lanes, torch, lanes, ...), so that a machine whose speed drifts, as a
shared one does, slows both alike; the medians are compared. It isolates the masks:
the end-to-end comparison is `python -m bench --workloads lora` with and without
`--rawtune-arg=--no-lane-dropout`.
"""

import argparse
import copy
import statistics
import time

import torch

from bench.run import BPE_VOCAB, LLAMA_SMALL, LORA
from core.dropout import use_lane_dropout


def lora_models(vocab: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The workload's LoRA Llama twice, with equal weights: torch's dropout, lane dropout."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **LLAMA_SMALL))
    model = get_peft_model(base, LoraConfig(**LORA, task_type="CAUSAL_LM")).train()
    lanes = copy.deepcopy(model)
    use_lane_dropout(lanes)
    return model, lanes


def step_seconds(model: torch.nn.Module, batch: torch.Tensor, bf16: bool) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256, help="tokens a row")
    args = parser.parse_args()
    vocab = BPE_VOCAB  # the workload's tokenizer, at its full size
    models = dict(zip(("torch", "lanes"), lora_models(vocab)))
    batch = torch.randint(0, vocab, (args.batch, args.length),
                          generator=torch.Generator().manual_seed(0))
    print(f"{args.batch} x {args.length} tokens, {torch.get_num_threads()} threads, "
          f"median of {args.steps} forward+backward steps each, taken in turns")
    for bf16 in (False, True):
        times = {name: [] for name in models}
        for i in range(args.steps + 2):  # the first two: warm-up
            for name, model in models.items():
                seconds = step_seconds(model, batch, bf16)
                if i >= 2:
                    times[name].append(seconds)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        print(f"{'bf16' if bf16 else 'fp32'}: torch's dropout {ms['torch']:.0f} ms, lane "
              f"dropout {ms['lanes']:.0f} ms a step: {ms['torch'] / ms['lanes']:.2f}x")


if __name__ == "__main__":
    main()
