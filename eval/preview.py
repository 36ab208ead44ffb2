"""What a run trains on, shown: training rows as text, the trained tokens marked.

Every LoRA run writes `preview.txt`: its first training rows as the model sees them
(template, special tokens and all), each run of trained tokens — the tokens whose
labels are targets of the loss — between `[[` and `]]`, with the row's token counts.
It is the quickest check that a template trains what it should: the answers and the
token that ends each, not the prompts. `--preview` prints the first row as well,
the trained text in colour on a terminal.
"""

from __future__ import annotations

from pathlib import Path

from eval.decoding import decode
from eval.lm import IGNORE

OPEN, CLOSE = "[[", "]]"
N_ROWS = 5


def pieces(row: dict, tokenizer) -> list[tuple[str, bool]]:
    """The row's text as (text, trained) runs, in order.

    Each run is what it adds to the decoding of the tokens before it, so the pieces
    join to exactly the decoded row (a tokenizer's decoding of a run alone may drop
    a leading space).
    """
    ids, trained = row["input_ids"], [label != IGNORE for label in row["labels"]]
    out, done, start = [], "", 0
    for end in range(1, len(ids) + 1):
        if end < len(ids) and trained[end] == trained[start]:
            continue
        text = decode(tokenizer, ids[:end])
        piece = text[len(done):] if text.startswith(done) else decode(tokenizer, ids[start:end])
        out.append((piece, trained[start]))
        done, start = text, end
    return out


def counts(row: dict) -> str:
    n_trained = sum(label != IGNORE for label in row["labels"])
    return f"{len(row['input_ids'])} tokens, {n_trained} trained"


def marked(row: dict, tokenizer) -> str:
    return "".join(f"{OPEN}{text}{CLOSE}" if trained else text
                   for text, trained in pieces(row, tokenizer))


def write_preview(path: Path, rows: list[dict], tokenizer, n: int = N_ROWS) -> None:
    """The first n rows, marked, with their token counts."""
    lines = [f"# The first {min(n, len(rows))} training rows as the model sees them. Text "
             f"between {OPEN} and {CLOSE} is trained (its tokens are targets of the loss); "
             f"the rest is context only.", ""]
    for i, row in enumerate(rows[:n], start=1):
        lines += [f"--- row {i}: {counts(row)} ---", marked(row, tokenizer), ""]
    path.write_text("\n".join(lines))


def print_first(rows: list[dict], tokenizer) -> None:
    """The first row, its trained runs marked and, on a terminal, in colour."""
    from rich.console import Console
    from rich.text import Text

    text = Text(f"preview, training row 1 ({counts(rows[0])}; trained text in {OPEN} {CLOSE}):\n",
                style="bold")
    for piece, trained in pieces(rows[0], tokenizer):
        text.append(f"{OPEN}{piece}{CLOSE}" if trained else piece,
                    style="bold green" if trained else "dim")
    Console(soft_wrap=True).print(text)
