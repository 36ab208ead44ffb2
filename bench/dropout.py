"""What dropout costs a CPU training step, torch's against rawtune's lane dropout.

    python -m bench.dropout                     # lora, fp32 and bf16, 8 x 256 tokens
    python -m bench.dropout --model cls         # MiniLM's shape, 16 x 256 tokens
    python -m bench.dropout --model attention   # one MiniLM layer's attention alone
    python -m bench.dropout --steps 30 --length 512

Two copies of one model with equal weights take forward-and-backward steps on one
fixed batch in turns (torch, lanes, torch, lanes, ...), so that a machine whose speed
drifts, as a shared one does, slows both alike; the medians are compared. The
"torch" copy is what transformers and peft build; the "lanes" copy is what rawtune's
loop makes of it on a CPU (`--lane-dropout`): `core.dropout.LaneDropout` for every
`nn.Dropout` and `core.attention`'s chunked attention for sdpa's attention dropout.

- `lora`: the `lora` workload's model (the Llama of hidden 256 x 4 layers, LoRA r 16
  with dropout 0.05 on all seven projections; no attention dropout).
- `cls`: a BERT of all-MiniLM-L6-v2's shape (hidden 384, 6 layers, 12 heads, dropout
  0.1 on hidden states and attention), random weights, a two-label head.
- `attention`: that model's attention alone, one layer's worth (16 rows x 12 heads x 32
  dims, every fourth row half padding): `F.scaled_dot_product_attention` with dropout
  0.1 against `core.attention.lane_attention`.

It isolates dropout: the end-to-end comparison is `python -m bench --workloads lora
cls-long` with and without `--rawtune-arg=--no-lane-dropout`.
"""

import argparse
import copy
import statistics
import time
from typing import Callable

import torch
from torch import nn

from bench.run import BPE_VOCAB, LLAMA_SMALL, LORA
from core.attention import use_lane_attention
from core.dropout import use_lane_dropout

MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536)  # all-MiniLM-L6-v2's config; BERT's dropouts of 0.1


def build(model: str) -> tuple[torch.nn.Module, int]:
    """The model as transformers/peft build it, and its vocabulary size."""
    torch.manual_seed(0)
    if model == "cls":
        from transformers import BertConfig, BertForSequenceClassification
        config = BertConfig(**MINILM, num_labels=2)
        model = BertForSequenceClassification._from_config(config, attn_implementation="sdpa")
        return model, config.vocab_size
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    base = LlamaForCausalLM(LlamaConfig(vocab_size=BPE_VOCAB, **LLAMA_SMALL))
    return get_peft_model(base, LoraConfig(**LORA, task_type="CAUSAL_LM")), BPE_VOCAB


def both(model: str) -> tuple[dict[str, torch.nn.Module], int]:
    """The model twice, with equal weights: torch's dropout, and rawtune's on a CPU."""
    torch_model, vocab = build(model)
    lanes = copy.deepcopy(torch_model)
    use_lane_dropout(lanes)
    use_lane_attention(lanes)
    return {"torch": torch_model.train(), "lanes": lanes.train()}, vocab


Step = tuple[Callable[[], torch.Tensor], list[torch.Tensor]]  # a loss, and what it trains


def attention_steps(rows: int, length: int) -> dict[str, Step]:
    """One MiniLM layer's attention with dropout 0.1, as torch runs it and as rawtune does."""
    from torch.nn.functional import scaled_dot_product_attention

    from core.attention import lane_attention
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, 12, length, 32, generator=generator, requires_grad=True)
               for _ in range(3))
    mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    mask[::4, ..., length // 2:] = False

    class Layer(nn.Module):
        is_causal = False
    return {"torch": (lambda: scaled_dot_product_attention(q, k, v, mask, dropout_p=0.1).sum(),
                      [q, k, v]),
            "lanes": (lambda: lane_attention(Layer(), q, k, v, mask, dropout=0.1)[0].sum(),
                      [q, k, v])}


def model_steps(model: str, rows: int, length: int) -> dict[str, Step]:
    """The model's loss on one fixed batch, as torch's copy and the lanes copy compute it."""
    models, vocab = both(model)
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
    inputs = ({"input_ids": ids, "labels": torch.arange(rows) % 2} if model == "cls"
              else {"input_ids": ids, "labels": ids, "use_cache": False})
    return {name: ((lambda m=m: m(**inputs).loss), list(m.parameters()))
            for name, m in models.items()}


def step_seconds(step: Step, bf16: bool) -> float:
    """One forward and backward, timed; then the gradients are dropped (zero_grad)."""
    loss_of, trained = step
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_of()
    loss.backward()
    seconds = time.perf_counter() - start
    for tensor in trained:
        tensor.grad = None
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["lora", "cls", "attention"], default="lora")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each model")
    parser.add_argument("--batch", type=int, help="rows a batch (default: lora 8, else 16)")
    parser.add_argument("--length", type=int, default=256, help="tokens a row")
    args = parser.parse_args()
    rows = args.batch or (8 if args.model == "lora" else 16)
    steps = (attention_steps(rows, args.length) if args.model == "attention"
             else model_steps(args.model, rows, args.length))
    print(f"{args.model}: {rows} x {args.length} tokens, {torch.get_num_threads()} threads, "
          f"median of {args.steps} forward+backward steps each, taken in turns")
    for bf16 in (False, True):
        times = {name: [] for name in steps}
        for i in range(args.steps + 2):  # the first two: warm-up
            for name, step in steps.items():
                seconds = step_seconds(step, bf16)
                if i >= 2:
                    times[name].append(seconds)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        print(f"{'bf16' if bf16 else 'fp32'}: torch's dropout {ms['torch']:.1f} ms, lane "
              f"dropout {ms['lanes']:.1f} ms a step: {ms['torch'] / ms['lanes']:.2f}x")


if __name__ == "__main__":
    main()
