"""How a run turns rows into text: an instruction template or a chat template.

Training encodes rows with it; generation (samples.md, `python -m eval.generate`)
renders a question with the same one, so a model is asked as it was trained. A run
records its format in config.json (`data_format`, `prompt_template_text`,
`chat_template_text`), and `run_format` rebuilds it from there.
"""

from __future__ import annotations

from core.errors import fail
from tasks.chat import encode_chats
from tasks.chat_template import ChatTemplate, named_template, render_text
from tasks.instruct import ALPACA, Encoded, PromptTemplate, encode, prompt_template


class InstructFormat:
    """Instruction/input/output rows and a prompt template; answers end with EOS."""

    kind = "instruct"
    end_of_turn = None  # the EOS ends an answer

    def __init__(self, template: PromptTemplate, tokenizer):
        self.template, self.tokenizer = template, tokenizer

    def encode(self, examples: list[dict], max_length: int, where: str) -> Encoded:
        return encode(examples, self.template, self.tokenizer, max_length, where)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt for the last user message (an instruction template holds one turn)."""
        bos = [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]
        text = self.template.render(messages[-1]["content"], "")
        return bos + self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def record(self) -> dict:
        return {"data_format": self.kind, "prompt_template_text": self.template.with_input,
                "prompt_template_no_input_text": self.template.no_input,
                "chat_template_text": None}


class ChatFormat:
    """Conversations and a chat template; answers end with the template's end-of-turn."""

    kind = "chat"

    def __init__(self, template: ChatTemplate):
        self.template, self.tokenizer = template, template.tokenizer
        self.end_of_turn = template.end_of_turn

    def encode(self, conversations: list[list[dict]], max_length: int, where: str) -> Encoded:
        return encode_chats(conversations, self.template, max_length, where)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.tokenizer(self.template.prompt(messages), add_special_tokens=False)["input_ids"]

    def record(self) -> dict:
        return {"data_format": self.kind, "prompt_template_text": None,
                "prompt_template_no_input_text": None, "chat_template_text": self.template.text}


def row_format(cfg, kind: str, tokenizer) -> InstructFormat | ChatFormat:
    """The format of a run's rows, from its settings; every template is checked here."""
    if kind == "instruct":
        if cfg.chat_template:
            raise fail("--chat-template renders conversations, but the rows are instructions",
                       "drop --chat-template, or train on a column of messages "
                       "(--messages-column)")
        return InstructFormat(prompt_template(cfg.prompt_template, cfg.prompt_template_no_input),
                              tokenizer)
    if cfg.prompt_template != ALPACA or cfg.prompt_template_no_input:
        raise fail("--prompt-template renders instruction rows, but the rows are conversations",
                   "drop it (the chat template renders them), or pass --messages-column none "
                   "to train on instruction columns")
    text = named_template(cfg.chat_template, cfg.uses_demo_model()) or tokenizer.chat_template
    if text is None:
        raise fail(f"the tokenizer of {cfg.model} has no chat template",
                   "pass --chat-template chatml (shipped with rawtune) or --chat-template "
                   "FILE.jinja")
    # The tokenizer saved beside the adapter and the merged model carries the template
    # they were trained with, so apply_chat_template prompts them as training did.
    tokenizer.chat_template = text
    return ChatFormat(ChatTemplate(text, tokenizer))


def tokenizer_texts(cfg, kind: str, rows: list) -> list[dict]:
    """Rows as texts (a dict per row), which the demo's tokenizer is trained on; a real
    model's tokenizer needs none."""
    if kind == "instruct" or not cfg.uses_demo_model():
        return rows if kind == "instruct" else []
    template = named_template(cfg.chat_template, demo=True)
    return [{"text": render_text(template, messages)[0]} for messages in rows]


def run_format(config: dict, tokenizer) -> InstructFormat | ChatFormat:
    """The format a finished run recorded in config.json; Alpaca's for a bare model
    whose tokenizer has no chat template."""
    if config.get("chat_template_text"):
        return ChatFormat(ChatTemplate(config["chat_template_text"], tokenizer))
    if config.get("prompt_template_text"):
        return InstructFormat(PromptTemplate(config["prompt_template_text"],
                                             config["prompt_template_no_input_text"]), tokenizer)
    if tokenizer.chat_template:
        return ChatFormat(ChatTemplate(tokenizer.chat_template, tokenizer))
    return InstructFormat(prompt_template(ALPACA), tokenizer)
