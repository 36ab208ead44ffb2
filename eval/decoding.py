"""Token ids back to text, for previews and answers, special tokens kept.

transformers' sentencepiece backend (OpenLLaMA's tokenizer here) joins pieces as
written, so a byte-fallback piece comes out as "<0x0A>" instead of a newline, and
it trims the text; sentencepiece's own decoder is used for it instead, run by run
between the special tokens it does not know.
"""

from __future__ import annotations


def decode(tokenizer, ids: list[int]) -> str:
    sp = getattr(tokenizer, "sp_model", None)
    if sp is None:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    out, run = [], []
    for token in [*ids, None]:
        if token is not None and token not in special:
            run.append(token)
            continue
        if run:
            out.append(sp.decode(run))
            run = []
        if token is not None:
            out.append(tokenizer.convert_ids_to_tokens(token))
    return "".join(out)


def answer_text(tokenizer, ids: list[int], end_of_turn: str | None) -> str:
    """The answer generated ids spell: up to the EOS or the end-of-turn text, trimmed."""
    if tokenizer.eos_token_id in ids:
        ids = ids[:ids.index(tokenizer.eos_token_id)]
    text = decode(tokenizer, ids)
    if end_of_turn and end_of_turn in text:
        text = text[:text.index(end_of_turn)]
    return text.strip()
