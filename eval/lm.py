"""Language-model loss and perplexity, weighted by target token.

A causal LM predicts token t+1 from tokens up to t, so the logits at position t
are scored against the label at position t+1 ("the shift"). Labels of -100 (the
prompt and the padding) are not targets. The eval loss is the sum of every target
token's cross-entropy over the whole eval set divided by the number of target
tokens, so a long answer weighs by its tokens rather than as one example;
perplexity is exp(loss). HF's own `labels=` loss is the same mean for one batch.

The sweep plot uses matplotlib's `Figure` directly (no pyplot state, headless-safe).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.batching import eval_batches, filler
from eval.classification import PLOT_DPI
from eval.plot import smooth

IGNORE = -100  # the label of a token that is not a target


def target_count(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens are targets once labels are shifted left by one."""
    return (labels[:, 1:] != IGNORE).sum()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the target tokens, computed in fp32.

    Softmax over bf16 logits loses the small differences the loss is made of, so
    the logits are upcast first.
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


# Rows of logits upcast to fp32 at a time: bounds the fp32 copy to CHUNK x vocabulary.
CHUNK = 1024


def target_loss_sum(model: torch.nn.Module, head: torch.nn.Module | None,
                    batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The summed fp32 cross-entropy of a batch's target tokens, with the LM head run
    on target positions only.

    Most positions of an instruction batch are prompt or padding: nothing is learnt
    from their logits, yet the head (vocabulary x hidden, a fifth of a small model)
    and a softmax over the vocabulary would run there too. A hook on the head's input
    keeps only the hidden states whose next token is a target, so the model returns
    logits of shape [targets, vocabulary]. It runs inside the model's forward, so
    data-parallel and FSDP wrappers, and a LoRA adapter on the head, work unchanged.
    `head` is the model's output embedding (`get_output_embeddings()`); None falls
    back to full logits.
    """
    labels = batch["labels"]
    # No key/value cache: training and scoring read each position once, and a cache
    # would copy every layer's keys and values (under --compile, it also makes each
    # layer a graph of its own, past the compiler's limit).
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "use_cache": False}
    if head is None:
        return token_loss_sum(model(**inputs).logits, labels)
    keep = labels[:, 1:] != IGNORE  # position t predicts token t + 1

    def only_targets(module, args):
        return (args[0][:, :-1][keep],) + args[1:]

    handle = head.register_forward_pre_hook(only_targets)
    try:
        logits = model(**inputs).logits  # [targets, vocabulary]
    finally:
        handle.remove()
    targets = labels[:, 1:][keep]
    return sum((F.cross_entropy(logits[i:i + CHUNK].float(), targets[i:i + CHUNK],
                                reduction="sum") for i in range(0, len(targets), CHUNK)),
               start=logits.sum().float() * 0)  # 0, yet in the graph when there is no target


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, rows: Sequence[dict],
                collate: Callable[[list[dict]], dict[str, torch.Tensor]], batch_size: int,
                accelerator) -> dict[str, Any]:
    """Token-weighted loss and perplexity over all of `rows`, the same on every rank.

    Each rank scores its shard (core.batching.eval_batches: every row exactly once
    across ranks); the loss and token sums are then added up over ranks, which
    keeps the mean weighted by tokens rather than by rank.
    """
    lengths = [len(r["input_ids"]) for r in rows]
    head = output_head(model)
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss, tokens, rows
    for idx in eval_batches(len(rows), batch_size, accelerator.num_processes,
                            accelerator.process_index, lengths):
        batch = {k: v.to(accelerator.device)
                 for k, v in collate([rows[i] for i in filler(idx)]).items()}
        with accelerator.autocast():
            loss_sum = target_loss_sum(model, head, batch)
        if not idx:  # a filler batch: see core.batching.eval_batches
            continue
        totals += torch.stack([loss_sum.double(),
                               target_count(batch["labels"]).double(),
                               torch.tensor(len(idx), dtype=torch.float64,
                                            device=accelerator.device)])
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    loss_sum, tokens, n_rows = totals.tolist()
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),  # exp(>709) overflows a float
            "n_eval_tokens": int(tokens), "n_eval": int(n_rows)}


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The LM head of a causal LM, inside any data-parallel or peft wrapper."""
    inner = getattr(model, "module", model)  # DDP keeps the model as .module
    get = getattr(inner, "get_output_embeddings", None)
    return get() if get else None


def plot_loss_vs_r(curves: dict[int, list[tuple[int, float]]],
                   eval_curves: dict[int, list[tuple[int, float]]], eval_loss: dict[int, float],
                   eval_loss_before: float, path: str | Path) -> None:
    """Left: training loss per step for each rank. Middle: eval loss per evaluation for
    each rank, from the base model's at step 0. Right: final eval loss against r (log2 axis).

    Side by side, the left and middle panels show under- and over-fitting: a rank whose
    training loss keeps falling while its eval loss turns up is memorising."""
    import matplotlib  # here, not at the top: a training process need not hold it
    from matplotlib.figure import Figure
    fig = Figure(figsize=(16, 4.2), layout="constrained")
    left, middle, right = fig.subplots(1, 3)
    colors = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(curves)))
    for color, (r, points) in zip(colors, sorted(curves.items())):
        steps, losses = zip(*points)
        left.plot(steps, losses, color=color, alpha=0.2, linewidth=0.8)  # raw, faint
        left.plot(steps, smooth(losses), color=color, label=f"r={r}")
        steps, losses = zip(*[(0, eval_loss_before), *eval_curves.get(r, [])])
        middle.plot(steps, losses, color=color, marker="o", markersize=3, label=f"r={r}")
    left.set(xlabel="optimizer step", ylabel="training loss (per target token)",
             title="Training loss (smoothed)")
    left.legend()
    middle.set(xlabel="optimizer step", ylabel="eval loss (per target token)",
               title="Eval loss during training")
    middle.legend()
    ranks = sorted(eval_loss)
    right.plot(ranks, [eval_loss[r] for r in ranks], marker="o")
    right.axhline(eval_loss_before, color="grey", linestyle="--", label="before training")
    right.set_xscale("log", base=2)
    right.set_xticks(ranks, [str(r) for r in ranks])
    right.set(xlabel="LoRA rank r", ylabel="eval loss (per target token)",
              title="Eval loss of the saved adapter vs rank")
    right.legend()
    fig.savefig(path, dpi=PLOT_DPI, format="png")
