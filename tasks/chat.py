"""Conversations: rows of messages to tokens, with the loss on the assistant's turns only.

Rows
----
A conversation is a list of messages, `{"role": "system" | "user" | "assistant",
"content": TEXT}`, with at least one assistant turn; the assistant's turns are what
the model learns. Messages after the last assistant turn teach nothing and are left
out.

Tokens and labels
-----------------
The chat template renders the conversation (tasks/chat_template.py says which
characters of it are trained: each assistant turn's content and its end-of-turn
token). The text is tokenised piece by piece — untrained, trained, untrained, ... —
and the ids joined, so a trained piece begins exactly where the model's answer
begins when it generates after the template's prompt, whatever the tokenizer merges:

    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n | Hello.<|im_end|>
    -100 ...                                                 | Hello.<|im_end|>    <- labels

The loss is then the same per-token mean as for instruction rows (tasks/instruct.py).

Truncation
----------
A conversation longer than `max_length` loses whole exchanges from its start (a
user turn and the assistant's reply), keeping its system prompt when that fits,
until it fits; the last exchange is always kept. A conversation whose last exchange
alone does not fit is dropped. Both are counted.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from core.errors import fail
from eval.lm import IGNORE
from tasks.chat_template import ChatTemplate
from tasks.instruct import Encoded, pair_examples

ROLES = ("system", "user", "assistant")
SHAPE = 'write each as [{"role": "user", "content": "..."}, {"role": "assistant", ...}]'

Conversation = list[dict[str, str]]


def to_conversations(rows, column: str, where: str) -> list[Conversation]:
    """The column's conversations, each checked; only role and content are kept."""
    return [check_conversation(cell, f"row {i} of {where}", column)
            for i, cell in enumerate(rows[column])]


def check_conversation(cell, what: str, column: str) -> Conversation:
    if not isinstance(cell, list) or not cell or not all(isinstance(m, dict) for m in cell):
        raise fail(f"{what} has {_described(cell)} in column '{column}', not a list of "
                   f"role/content objects", SHAPE)
    messages = []
    for n, message in enumerate(cell):
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise fail(f"{what}: message {n} has no text 'role' and 'content'", SHAPE)
        if role not in ROLES:
            raise fail(f"{what}: message {n} has the unknown role '{role}'",
                       f"use {', '.join(ROLES)}")
        if role == "assistant" and not content.strip():
            raise fail(f"{what}: message {n} is an empty assistant turn",
                       "fill it in or remove it: an empty answer teaches nothing")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise fail(f"{what} has no assistant turn",
                   "add the answer to learn as an assistant message, or remove the row")
    return messages


def _described(cell) -> str:
    if not isinstance(cell, list):
        return f"a {type(cell).__name__}"
    if not cell:
        return "an empty list"
    odd = next(m for m in cell if not isinstance(m, dict))
    return f"a list of {type(odd).__name__}"


def pair_conversations(pairs: Iterable[Sequence[str]],
                       where: str = "--add-example") -> list[Conversation]:
    """(question, answer) pairs as one-exchange conversations."""
    return [[{"role": "user", "content": e["instruction"]},
             {"role": "assistant", "content": e["output"]}] for e in pair_examples(pairs, where)]


def encode_conversation(template: ChatTemplate, messages: Conversation) -> dict[str, list[int]]:
    """{"input_ids", "labels"}: labels are the ids of the trained pieces, -100 elsewhere."""
    text, spans = template.trained_spans(messages)
    cuts = [0] + [i for span in spans for i in span]
    pieces = [text[a:b] for a, b in zip(cuts, cuts[1:])]  # untrained, trained, ...
    input_ids, labels = [], []
    for n, ids in enumerate(template.tokenizer(pieces, add_special_tokens=False)["input_ids"]):
        input_ids += ids
        labels += ids if n % 2 else [IGNORE] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


def shortened(messages: Conversation) -> Iterator[Conversation]:
    """The conversation up to its last assistant turn, then ever shorter ones: whole
    exchanges dropped from the start with the system prompt kept; last, the last
    exchange alone."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[:last + 1]
    system = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(system):]
    starts = [0] + [i + 1 for i, m in enumerate(body[:-1]) if m["role"] == "assistant"]
    for start in starts:
        yield system + body[start:]
    if system:
        yield body[starts[-1]:]


def encode_chats(conversations: list[Conversation], template: ChatTemplate, max_length: int,
                 where: str) -> Encoded:
    """Every conversation encoded to fit `max_length` (see Truncation above)."""
    rows, truncated, dropped = [], 0, 0
    for messages in conversations:
        for n, candidate in enumerate(shortened(messages)):
            row = encode_conversation(template, candidate)
            if len(row["input_ids"]) <= max_length:
                rows.append(row)
                truncated += n > 0
                break
        else:
            dropped += 1
    if not rows:
        raise fail(f"--max-length {max_length} cannot hold the last exchange of any "
                   f"conversation of {where}", "raise --max-length")
    return Encoded(rows, truncated, dropped)
