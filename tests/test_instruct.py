"""tasks/instruct.py: templates, prompt masking, truncation, the held-out split, added examples."""

import json

import datasets
import pytest

from core.demo import bpe_tokenizer, data_file
from core.errors import UsageError
from tasks.instruct import (ALPACA_NO_INPUT, ALPACA_WITH_INPUT, Columns, add_examples, encode,
                            fit_prompt, pair_examples, prompt_template, split_eval, to_examples)

ROWS = [json.loads(line) for line in open(data_file("qa.jsonl"))]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [ALPACA_WITH_INPUT] + [r["instruction"] + " " + r["input"] + " " + r["output"]
                                   for r in ROWS]
    return bpe_tokenizer(texts, vocab_size=600)


def test_alpaca_template_uses_the_input_section_only_when_there_is_input():
    template = prompt_template("alpaca")
    with_input = template.render("Reverse the words.", "a b c")
    assert "### Input:\na b c\n\n### Response:\n" in with_input
    assert with_input.startswith("Below is an instruction that describes a task, paired with")
    without = template.render("Name a colour.", "")
    assert without == ALPACA_NO_INPUT.format(instruction="Name a colour.")
    assert "### Input" not in without


def test_custom_template_inline_and_from_a_file(tmp_path):
    inline = prompt_template("Q: {instruction}\\nContext: {input}\\nA: ")
    assert inline.render("why?", "sky") == "Q: why?\nContext: sky\nA: "
    assert inline.render("why?", "") == "Q: why?\nContext: \nA: "  # no variant: empty input
    file = tmp_path / "t.txt"
    file.write_text("Task {instruction} on {input}\n")
    variant = tmp_path / "v.txt"
    variant.write_text("Task {instruction}\n")
    template = prompt_template(str(file), str(variant))
    assert template.render("x", "y") == "Task x on y\n"
    assert template.render("x", "") == "Task x\n"


@pytest.mark.parametrize("spec, words", [
    ("Q: {instruction} A:", "lacks the placeholder(s) {input}"),
    ("Q: {question} {input} {instruction}", "unknown placeholder(s) {question}"),
    ("Q: {instruction {input}", "not a valid template"),
    ("no/such/template.txt", "cannot read prompt template file"),
])
def test_bad_templates_are_usage_errors(spec, words):
    with pytest.raises(UsageError, match=words.replace("(", r"\(").replace(")", r"\)")):
        prompt_template(spec)


def test_prompt_labels_are_masked_and_the_response_is_exact(tokenizer):
    template = prompt_template("alpaca")
    example = {"instruction": "Reverse the order of these words.", "input": "red blue",
               "output": "blue red"}
    (row,) = encode([example], template, tokenizer, 512, "data").rows
    prompt = tokenizer(template.render(example["instruction"], example["input"]),
                       add_special_tokens=False)["input_ids"]
    response = tokenizer(example["output"], add_special_tokens=False)["input_ids"]
    expected_prompt = [tokenizer.bos_token_id] + prompt
    assert row["input_ids"] == expected_prompt + response + [tokenizer.eos_token_id]
    assert row["labels"] == [-100] * len(expected_prompt) + response + [tokenizer.eos_token_id]
    assert tokenizer.decode(response) == "blue red"


def test_long_prompts_lose_their_middle_and_hopeless_rows_are_dropped(tokenizer):
    template = prompt_template("alpaca")
    long = {"instruction": "Summarise. " + "word " * 400, "input": "", "output": "short"}
    fine = {"instruction": "Hi", "input": "", "output": "Hello"}
    huge = {"instruction": "Hi", "input": "", "output": "token " * 500}
    encoded = encode([long, fine, huge], template, tokenizer, 200, "data")
    assert len(encoded.rows[1]["input_ids"]) < 200  # `fine` fits as it is
    assert (encoded.truncated, encoded.dropped, len(encoded.rows)) == (1, 1, 2)
    cut = encoded.rows[0]
    assert len(cut["input_ids"]) == 200
    full_prompt = [tokenizer.bos_token_id] + tokenizer(
        template.render(long["instruction"], ""), add_special_tokens=False)["input_ids"]
    n_prompt = cut["labels"].count(-100)
    head = (n_prompt + 1) // 2
    assert cut["input_ids"][:head] == full_prompt[:head]  # BOS and the instruction's start
    assert cut["input_ids"][head:n_prompt] == full_prompt[len(full_prompt) - (n_prompt - head):]
    assert tokenizer.decode(cut["input_ids"][:n_prompt]).endswith("### Response:\n")


def test_fit_prompt_keeps_head_and_tail():
    assert fit_prompt(list(range(10)), 4, 20) == list(range(10))
    assert fit_prompt(list(range(10)), 4, 9) == [0, 1, 2, 7, 8, 9][:3] + [8, 9]
    assert fit_prompt(list(range(10)), 4, 4) is None


def test_max_length_that_holds_no_response_is_a_usage_error(tokenizer):
    with pytest.raises(UsageError, match="cannot hold any response"):
        encode([{"instruction": "Hi", "input": "", "output": "Hello there"}],
               prompt_template("alpaca"), tokenizer, 2, "the training data")


def test_input_output_data_uses_the_input_as_instruction():
    rows = datasets.Dataset.from_list([{"input": "2+2?", "output": "4"}])
    assert to_examples(rows, Columns(None, "input", "output"), "data") == [
        {"instruction": "2+2?", "input": "", "output": "4"}]


def test_empty_outputs_are_refused():
    rows = datasets.Dataset.from_list([{"instruction": "a", "input": "", "output": "ok"},
                                       {"instruction": "b", "input": "", "output": "  "}])
    with pytest.raises(UsageError, match="row 1 of data has an empty 'output'"):
        to_examples(rows, Columns("instruction", "input", "output"), "data")


def test_held_out_rows_depend_on_seed_and_size_only():
    train, evaluation = split_eval(100, 0.05, seed=3)
    assert len(evaluation) == 5 and len(train) == 95 and not set(train) & set(evaluation)
    assert split_eval(100, 0.05, seed=3) == (train, evaluation)
    assert split_eval(100, 0.05, seed=4)[1] != evaluation


def test_add_examples_appends_pairs_and_rows_without_changing_the_dataset():
    data = datasets.Dataset.from_list(ROWS[:3])
    grown = add_examples(data, [("What is 2+2?", "4"),
                                {"instruction": "Say hi", "input": "to Bob", "output": "Hi Bob"}])
    assert len(data) == 3 and len(grown) == 5
    assert grown[3] == {"instruction": "What is 2+2?", "input": "", "output": "4"}
    assert grown[4] == {"instruction": "Say hi", "input": "to Bob", "output": "Hi Bob"}
    # The same as the study's dataset.add_item, one example at a time.
    by_items = data.add_item({"instruction": "What is 2+2?", "input": "", "output": "4"})
    assert by_items[3] == grown[3]


def test_add_examples_to_input_output_data_puts_the_question_in_the_input():
    data = datasets.Dataset.from_list([{"input": "1+1?", "output": "2"}])
    assert add_examples(data, [("3+3?", "6")])[1] == {"input": "3+3?", "output": "6"}


def test_pair_examples_refuse_empty_answers():
    assert pair_examples([("Q", "A")]) == [{"instruction": "Q", "input": "", "output": "A"}]
    with pytest.raises(UsageError, match="#2 has an empty ANSWER"):
        pair_examples([("Q", "A"), ("Q2", " ")])
