"""Dynamic padding: each batch is padded only to its own longest row."""

import torch


def pad_batch(rows: list[dict], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Stack token rows into tensors; `labels` are padded with -100 so padding costs no loss.

    Rows hold `input_ids` and optionally `labels` (a list per token, or one int per row)
    and other per-token lists the model takes (BERT's token_type_ids), padded with 0.
    With `multiple` > 1 the width is rounded up to a multiple of it: a GPU then meets
    a handful of batch shapes instead of one per length, and pays its per-shape kernel
    selection a handful of times. (Keep it a divisor of the model's position limit.)
    """
    width = -(-max(len(r["input_ids"]) for r in rows) // multiple) * multiple
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    token_labels = "labels" in rows[0] and isinstance(rows[0]["labels"], list)
    labels = torch.full((len(rows), width), -100, dtype=torch.long) if token_labels else None
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        mask[i, :n] = 1
        if token_labels:
            labels[i, :n] = torch.tensor(row["labels"])
    batch = {"input_ids": ids, "attention_mask": mask}
    for key in rows[0].keys() - {"input_ids", "labels"}:
        batch[key] = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            batch[key][i, :len(row[key])] = torch.tensor(row[key])
    if token_labels:
        batch["labels"] = labels
    elif "labels" in rows[0]:
        batch["labels"] = torch.tensor([r["labels"] for r in rows])
    return batch
