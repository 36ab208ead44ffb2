"""Chat templates: which one a run uses, rendering it, and which characters it trains.

A conversation is rendered to text with a Jinja chat template (the tokenizer's own,
the ChatML one shipped as tasks/chatml.jinja, or a file). What is trained is, for
every assistant turn, its content and the end-of-turn token that follows it — the
token that teaches the model to stop — and nothing else: not the system or user
turns, not the role headers the template writes. Those characters are found in one
of two ways:

- the template marks them with `{% generation %}...{% endgeneration %}` (the marks
  `return_assistant_tokens_mask` reads): the marked span is cut to the content and
  the text after it up to its last non-space character (the end-of-turn);
- it has no marks: the conversation is rendered turn by turn. An assistant turn's
  text is what it adds to the rendering of the turns before it, after the header the
  template writes for a generation prompt; its content must appear there as given,
  followed by one of the tokenizer's special tokens (its end-of-turn).

Whatever a template does that these rules cannot follow (it rewrites earlier turns as
the conversation grows, changes the content, ends a turn without a special token)
is refused in one line: a run never trains on a mask it could not derive exactly.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from core.errors import fail

SHIPPED = {"chatml": "chatml.jinja"}
GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")
PROBE = [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}]
MARK_FIX = ("wrap each assistant turn's content and end-of-turn token in {% generation %}"
            "...{% endgeneration %} (as tasks/chatml.jinja does), or pass --chat-template chatml")


def named_template(spec: str | None, demo: bool) -> str | None:
    """The text of the template --chat-template names; None: the tokenizer's own.

    The demo's tokenizer is trained on the spot and has none, so the demo uses ChatML.
    """
    spec = spec or ("chatml" if demo else None)
    if spec is None:
        return None
    if spec in SHIPPED:
        return (resources.files("tasks") / SHIPPED[spec]).read_text(encoding="utf-8")
    try:
        return Path(spec).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise fail(f"cannot read --chat-template {spec} ({type(err).__name__})",
                   f"pass {' or '.join(SHIPPED)}, or a readable Jinja file") from None


def render_text(template: str, messages: list[dict], add_generation_prompt: bool = False,
                marks: bool = False, **tokens: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, with `marks`, the character spans of its
    {% generation %} blocks. `tokens` are the tokenizer's special tokens by name."""
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template
    try:
        texts, spans = render_jinja_template(
            conversations=[messages], chat_template=template, return_assistant_tokens_mask=marks,
            add_generation_prompt=add_generation_prompt, **tokens)
    except jinja2.TemplateError as err:
        raise fail(f"the chat template cannot render a conversation ({str(err)[:200]})",
                   "check the conversation's roles and their order against the template, "
                   "or pass --chat-template chatml") from None
    return texts[0], spans[0] if marks else []


class ChatTemplate:
    """A chat template bound to a tokenizer: rendering, trained spans, its end-of-turn."""

    def __init__(self, text: str, tokenizer):
        if not isinstance(text, str):  # a tokenizer may hold several templates by name
            raise fail("the tokenizer holds several named chat templates",
                       "pass the one to use with --chat-template FILE")
        self.text, self.tokenizer = text, tokenizer
        self.marked = bool(GENERATION_MARK.search(text))
        self.special = sorted({*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()},
                              key=len, reverse=True)  # the longest match wins
        text, (span,) = self.trained_spans(PROBE)  # checks the template before any row
        self.end_of_turn = text[span[0] + len(PROBE[1]["content"]):span[1]].strip()

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               marks: bool = False) -> tuple[str, list[tuple[int, int]]]:
        tokens = {k: v for k, v in self.tokenizer.special_tokens_map.items() if isinstance(v, str)}
        return render_text(self.text, messages, add_generation_prompt, marks, **tokens)

    def prompt(self, messages: list[dict]) -> str:
        """The conversation so far, ending where the assistant's answer begins."""
        return self.render(messages, add_generation_prompt=True)[0]

    def trained_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and, per assistant turn, the [start, end) characters
        trained: its content and its end-of-turn token."""
        assistant = [m for m in messages if m["role"] == "assistant"]
        if self.marked:
            text, marks = self.render(messages, marks=True)
            if len(marks) != len(assistant):
                raise fail(f"the chat template's {{% generation %}} blocks mark {len(marks)} "
                           f"span(s) in a conversation of {len(assistant)} assistant turn(s)",
                           MARK_FIX)
            return text, [self._marked(text, mark, m) for mark, m in zip(marks, assistant)]
        text = self.render(messages)[0]
        return text, [self._derived(messages, k, text) for k, m in enumerate(messages)
                      if m["role"] == "assistant"]

    def _marked(self, text: str, mark: tuple[int, int], message: dict) -> tuple[int, int]:
        """A {% generation %} span cut to the content and the end-of-turn after it."""
        start = _find_content(text, message, *mark)
        end = start + len(message["content"].strip())
        tail = text[end:mark[1]].rstrip()
        if not tail.strip():
            raise fail("the chat template's {% generation %} block holds no end-of-turn token "
                       "after the assistant's content: the model would never learn to stop",
                       MARK_FIX)
        return start, end + len(tail)

    def _derived(self, messages: list[dict], k: int, text: str) -> tuple[int, int]:
        """Assistant turn k's span, from the renderings of the turns before it."""
        prompt = self.prompt(messages[:k])
        turn = self.render(messages[:k + 1])[0]
        if not (turn.startswith(prompt) and text.startswith(turn)):
            raise fail("the chat template renders earlier turns differently as a conversation "
                       "grows, so the assistant's tokens cannot be derived turn by turn", MARK_FIX)
        start = _find_content(turn, messages[k], len(prompt), len(turn))
        end = start + len(messages[k]["content"].strip())
        rest = turn[end:]
        gap = len(rest) - len(rest.lstrip())
        token = next((s for s in self.special if rest[gap:].startswith(s)), None)
        if token is None:
            raise fail(f"the chat template ends an assistant turn with {rest[gap:gap + 20]!r}, "
                       f"not with a special token of the tokenizer, so its end-of-turn token is "
                       f"unknown", MARK_FIX)
        return start, end + gap + len(token)


def _find_content(text: str, message: dict, start: int, end: int) -> int:
    """Where the message's content (trimmed, as templates often write it) begins."""
    at = text.find(message["content"].strip(), start, end)
    if at < 0:
        raise fail("the chat template does not write an assistant turn's content as given "
                   f"({message['content'][:40]!r}), so its tokens cannot be found",
                   "pass --chat-template chatml, or a template that writes the content as is")
    return at
