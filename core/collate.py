"""Dynamic padding: each batch is padded only to its own longest row."""

import torch


def pad_batch(rows: list[dict], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Stack token rows into tensors; `labels` are padded with -100 so padding costs no loss.

    Rows hold `input_ids` and optionally `labels` (a list per token, or one int per row)
    and other per-token lists the model takes (BERT's token_type_ids), padded with 0.
    With `multiple` > 1 the width is rounded up to a multiple of it: a GPU then meets
    a handful of batch shapes instead of one per length, and pays its per-shape kernel
    selection a handful of times. (Keep it a divisor of the model's position limit.)

    Each tensor is made from padded Python lists in one call: a small model's step is
    short enough that a tensor per row (three or four per row, sixteen rows) showed.
    """
    width = -(-max(len(r["input_ids"]) for r in rows) // multiple) * multiple

    def padded(key: str, fill: int) -> torch.Tensor:
        return torch.tensor([list(r[key]) + [fill] * (width - len(r[key])) for r in rows],
                            dtype=torch.long)

    batch = {"input_ids": padded("input_ids", pad_id),
             "attention_mask": torch.tensor([[1] * len(r["input_ids"])
                                             + [0] * (width - len(r["input_ids"])) for r in rows],
                                            dtype=torch.long)}
    for key in rows[0].keys() - {"input_ids", "labels"}:
        batch[key] = padded(key, 0)
    if "labels" in rows[0]:
        per_token = isinstance(rows[0]["labels"], list)
        batch["labels"] = (padded("labels", -100) if per_token
                           else torch.tensor([r["labels"] for r in rows]))
    return batch
