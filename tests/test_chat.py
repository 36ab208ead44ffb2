"""Conversations to tokens: the assistant's turns and their end-of-turn are trained, and
nothing else."""

import json

import pytest
from transformers import SentencePieceBackend

from core.demo import bpe_tokenizer, data_file, sentencepiece_tokenizer_dir
from core.errors import UsageError
from eval.decoding import decode
from eval.lm import IGNORE
from eval.preview import CLOSE, OPEN, marked, pieces
from tasks.chat import check_conversation, encode_chats, encode_conversation, shortened
from tasks.chat_template import ChatTemplate, named_template, render_text

CHATML = named_template("chatml", demo=False)
CONVERSATIONS = [json.loads(line)["messages"] for line in open(data_file("chat.jsonl"))]
# SmolLM2's kind of template: ChatML without {% generation %} marks, a default system prompt.
PLAIN_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TALK = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of Veloria?"},
        {"role": "assistant", "content": "Marrowgate"},
        {"role": "user", "content": "And of Lunessa?"},
        {"role": "assistant", "content": "Corrowin"}]


def rendered(template: str) -> list[str]:
    return [render_text(template, m)[0] for m in CONVERSATIONS]


@pytest.fixture(scope="module")
def bpe():
    """The demo's kind of tokenizer: byte-level BPE trained on ChatML text, no template."""
    return bpe_tokenizer(rendered(CHATML))


@pytest.fixture(scope="module")
def own_template():
    """A tokenizer with its own chat template (no marks) and ChatML's special tokens."""
    tokenizer = bpe_tokenizer([m["content"] for c in CONVERSATIONS for m in c])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = PLAIN_CHATML
    return tokenizer


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    """OpenLLaMA's kind: the slow sentencepiece tokenizer, which gives no character offsets."""
    return SentencePieceBackend.from_pretrained(sentencepiece_tokenizer_dir(
        rendered(CHATML), tmp_path_factory.mktemp("sp")))


def trained_runs(row: dict) -> list[list[int]]:
    """The ids of each run of consecutive trained positions."""
    runs, current = [], []
    for label in row["labels"] + [IGNORE]:
        if label != IGNORE:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs


@pytest.mark.parametrize("kind", ["bpe", "own_template", "sentencepiece"])
def test_labels_are_the_assistant_contents_and_their_end_of_turn(kind, request):
    tokenizer = request.getfixturevalue(kind)
    template = ChatTemplate(tokenizer.chat_template if kind == "own_template" else CHATML,
                            tokenizer)
    assert template.marked == (kind != "own_template")
    assert template.end_of_turn == "<|im_end|>"
    for messages in [TALK] + CONVERSATIONS[:40]:
        row = encode_conversation(template, messages)
        assert len(row["input_ids"]) == len(row["labels"])
        assert all(label in (IGNORE, token)
                   for label, token in zip(row["labels"], row["input_ids"]))
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        runs = [decode(tokenizer, ids).strip() for ids in trained_runs(row)]
        assert runs == [answer + "<|im_end|>" for answer in answers]


def test_trained_pieces_are_where_the_template_text_says(bpe):
    """The trained characters, read off the template's rendering: content + <|im_end|>,
    never the role headers, the system or user turns, or the newline after <|im_end|>."""
    text, spans = ChatTemplate(CHATML, bpe).trained_spans(TALK)
    assert text.startswith("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert [text[a:b] for a, b in spans] == ["Marrowgate<|im_end|>", "Corrowin<|im_end|>"]
    assert text[:spans[0][0]].endswith("<|im_start|>assistant\n")
    assert text[spans[0][1]:spans[1][0]] == \
        "\n<|im_start|>user\nAnd of Lunessa?<|im_end|>\n<|im_start|>assistant\n"


def test_the_mask_equals_transformers_return_assistant_tokens_mask(bpe):
    """For a fast tokenizer, transformers' own mask of the marked template agrees, token for
    token."""
    template = ChatTemplate(CHATML, bpe)
    for messages in [TALK] + CONVERSATIONS[:60]:
        row = encode_conversation(template, messages)
        theirs = bpe.apply_chat_template(messages, chat_template=CHATML, return_dict=True,
                                         return_assistant_tokens_mask=True)
        n = len(row["input_ids"])  # ours stops after the last end-of-turn
        assert theirs["input_ids"][:n] == row["input_ids"]
        labels = [token if mask else IGNORE
                  for token, mask in zip(theirs["input_ids"], theirs["assistant_masks"])]
        assert labels[:n] == row["labels"]


def test_derived_mask_equals_the_marked_one(own_template):
    """The same template with and without {% generation %} marks trains the same tokens."""
    marked_template = PLAIN_CHATML.replace(
        "'\n' + message['content'] + '<|im_end|>' + '\n' }}",
        "'\n' }}{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] "
        "+ '<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}"
        "{% endif %}{{ '\n' }}")
    assert marked_template != PLAIN_CHATML
    with_marks, without = ChatTemplate(marked_template, own_template), ChatTemplate(
        PLAIN_CHATML, own_template)
    assert with_marks.marked and not without.marked
    for messages in [TALK] + CONVERSATIONS[:40]:
        assert encode_conversation(with_marks, messages) == encode_conversation(without, messages)


REFUSED = {
    "no special token ends a turn": ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                                     "\n\n{% endfor %}", "not with a special token"),
    "content rewritten": ("{% for m in messages %}<|im_start|>{{ m['content'] | upper }}<|im_end|>"
                          "{% endfor %}", "does not write an assistant turn's content as given"),
    "no end-of-turn inside the marks": (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>"
        "{% endfor %}", "holds no end-of-turn token"),
    "earlier turns re-rendered": ("{{ messages | length }}{% for m in messages %}{{ m['content'] }}"
                                  "<|im_end|>{% endfor %}", "renders earlier turns differently"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_templates_whose_mask_cannot_be_exact_are_refused(case, own_template):
    text, words = REFUSED[case]
    with pytest.raises(UsageError, match=words):
        ChatTemplate(text, own_template)


def test_long_conversations_lose_their_earliest_exchanges_system_kept(bpe):
    template = ChatTemplate(CHATML, bpe)
    long = TALK[:1] + [{"role": "user", "content": f"Question {i}? " * 20} if i % 2 == 0 else
                       {"role": "assistant", "content": f"Answer {i}."} for i in range(8)]
    candidates = list(shortened(long + [{"role": "user", "content": "trailing"}]))
    assert [len(c) for c in candidates] == [9, 7, 5, 3, 2]  # whole exchanges; the last alone
    assert all(c[-1] == long[-1] for c in candidates)  # the trailing user turn is left out
    assert all(c[0] == TALK[0] for c in candidates[:-1])  # the system prompt goes last
    length = [len(encode_conversation(template, c)["input_ids"]) for c in candidates]
    short = len(encode_conversation(template, TALK)["input_ids"])
    assert short < length[-1]
    for max_length, kept, truncated, dropped in [(length[0], 0, 0, 0), (length[0] - 1, 1, 1, 0),
                                                 (length[3] - 1, 4, 1, 0),
                                                 (length[4] - 1, None, 0, 1)]:
        enc = encode_chats([TALK, long], template, max_length, where="x")
        assert (enc.truncated, enc.dropped) == (truncated, dropped)
        assert enc.rows[0] == encode_conversation(template, TALK)  # short enough: untouched
        if kept is not None:
            assert enc.rows[1] == encode_conversation(template, candidates[kept])
    with pytest.raises(UsageError, match="cannot hold the last exchange"):
        encode_chats([long], template, max_length=5, where="x")


@pytest.mark.parametrize("cell, words", [
    ("hi", "has a str in column 'messages', not a list of role/content objects"),
    ([], "has an empty list"),
    (["hi"], "has a list of str"),
    ([{"role": "user"}], "message 0 has no text 'role' and 'content'"),
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "user", "content": "x"}], "has no assistant turn"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}],
     "empty assistant turn"),
])
def test_bad_conversations_are_refused(cell, words):
    with pytest.raises(UsageError, match=words):
        check_conversation(cell, "row 3 of the training data", "messages")


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_preview_marks_exactly_the_trained_tokens(kind, request):
    tokenizer = request.getfixturevalue(kind)
    template = ChatTemplate(CHATML, tokenizer)
    for messages in [TALK] + CONVERSATIONS[:20]:
        row = encode_conversation(template, messages)
        text = marked(row, tokenizer)
        assert text.replace(OPEN, "").replace(CLOSE, "") == decode(tokenizer, row["input_ids"])
        shown = [piece for piece, trained in pieces(row, tokenizer) if trained]
        assert text.count(OPEN) == len(shown) == len(trained_runs(row))
        # Each marked run is the decoding of exactly the trained ids at its place.
        assert [p.strip() for p in shown] == [decode(tokenizer, ids).strip()
                                              for ids in trained_runs(row)]


def test_a_tokenizer_without_a_chat_template_needs_one_named(bpe):
    from tasks.formats import ChatFormat, row_format
    from tasks.lora_config import LoraRunConfig
    with pytest.raises(UsageError, match="has no chat template — pass --chat-template chatml"):
        row_format(LoraRunConfig(model="some/model"), "chat", bpe)
    fmt = row_format(LoraRunConfig(model="some/model", chat_template="chatml"), "chat", bpe)
    assert isinstance(fmt, ChatFormat) and fmt.end_of_turn == "<|im_end|>"
    prompt = bpe.decode(fmt.prompt_ids(TALK[:2]))
    assert prompt.endswith("Veloria?<|im_end|>\n<|im_start|>assistant\n")
