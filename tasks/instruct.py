"""Instruction tuning: rows to prompts, prompts to tokens, and the token-level loss.

Rows
----
Each row has an output (the answer to learn) and a prompt made of an instruction
and/or an input. Data without an instruction column (input/output pairs) uses the
input as the instruction; data without an input column has empty inputs.

Prompt template
---------------
The default is Alpaca's. A row with an input is rendered as

    Below is an instruction that describes a task, paired with an input that
    provides further context. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:

and a row whose input is empty with Alpaca's variant that has no input section.
A custom template has `{instruction}` and `{input}` placeholders (write a literal
brace as `{{` or `}}`; inline, `\\n` is a newline); a value without any `{` is the
path of a file holding the template. Its variant for rows without input, if given,
has `{instruction}` only; without it, such rows fill `{input}` with "".

Tokens and labels
-----------------
The prompt and the response are tokenised separately and their ids concatenated,
so the boundary between them is exact whatever the tokenizer merges:

    [BOS] prompt ids | response ids EOS
    -100 ... -100    | response ids EOS      <- labels

Only the response and its EOS are trained on (the EOS teaches the model to stop);
prompt and padding labels are -100. A row longer than `max_length` loses prompt
tokens from the middle of its prompt: the head keeps BOS and the task's
instruction, the tail keeps the end of the input and the "### Response:" marker the
answer follows. The response is never cut; a row whose response (with EOS) leaves
no room for a single prompt token is dropped. Both are counted.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import datasets
import torch

from core.collate import pad_batch
from core.errors import fail
from eval.lm import IGNORE, evaluate_lm, output_head, target_count, target_loss_sum

ALPACA = "alpaca"
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

Example = dict[str, str]  # {"instruction": ..., "input": ..., "output": ...}


@dataclass(frozen=True)
class PromptTemplate:
    with_input: str
    no_input: str

    def render(self, instruction: str, input: str) -> str:
        if input:
            return self.with_input.format(instruction=instruction, input=input)
        return self.no_input.format(instruction=instruction, input="")


def _read_template(spec: str) -> str:
    """The template itself, or the text of the file it names.

    A template always holds a placeholder, so a value without "{" is a file path.
    Inline, `\\n` stands for a newline, since a shell flag rarely holds a real one.
    """
    if "{" in spec:
        return spec.replace("\\n", "\n")
    try:
        return Path(spec).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise fail(f"cannot read prompt template file {spec} ({type(err).__name__})",
                   "give a readable UTF-8 file, or a template with {instruction} and {input}") from None


def _check_placeholders(template: str, needed: set[str], allowed: set[str], flag: str) -> None:
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise fail(f"{flag} is not a valid template ({err})",
                   "write a literal brace as {{ or }}") from None
    unknown = sorted(fields - allowed)
    if unknown:
        raise fail(f"{flag} has unknown placeholder(s) {', '.join('{' + f + '}' for f in unknown)}",
                   f"use only {', '.join('{' + a + '}' for a in sorted(allowed))}")
    missing = sorted(needed - fields)
    if missing:
        raise fail(f"{flag} lacks the placeholder(s) {', '.join('{' + m + '}' for m in missing)}",
                   "add them where the row's text belongs")


def prompt_template(spec: str, no_input_spec: str | None = None) -> PromptTemplate:
    """'alpaca', or a template (text or file) with its optional variant for empty inputs."""
    if spec == ALPACA and no_input_spec is None:
        return PromptTemplate(ALPACA_WITH_INPUT, ALPACA_NO_INPUT)
    with_input = ALPACA_WITH_INPUT if spec == ALPACA else _read_template(spec)
    _check_placeholders(with_input, {"instruction", "input"}, {"instruction", "input"},
                        "--prompt-template")
    if no_input_spec is None:
        return PromptTemplate(with_input, with_input)
    no_input = _read_template(no_input_spec)
    _check_placeholders(no_input, {"instruction"}, {"instruction"}, "--prompt-template-no-input")
    return PromptTemplate(with_input, no_input)


@dataclass(frozen=True)
class Columns:
    """Column names; `instruction` or `input` is None when the data lacks it."""

    instruction: str | None
    input: str | None
    output: str


def _texts(rows: datasets.Dataset, column: str | None, where: str, optional: bool) -> list[str]:
    if column is None:
        return [""] * len(rows)
    values = list(rows[column])
    for i, value in enumerate(values):
        if value is None and optional:
            continue
        if not isinstance(value, str):
            raise fail(f"row {i} of {where} has a {type(value).__name__} in column '{column}', "
                       f"not text", "make every value of that column a string")
    return [value or "" for value in values]


def to_examples(rows: datasets.Dataset, columns: Columns, where: str) -> list[Example]:
    """Rows as {"instruction", "input", "output"} texts; an output must not be empty."""
    outputs = _texts(rows, columns.output, where, optional=False)
    for i, output in enumerate(outputs):
        if not output.strip():
            raise fail(f"row {i} of {where} has an empty '{columns.output}'",
                       "fill it in or remove the row: an empty answer teaches nothing")
    instructions = _texts(rows, columns.instruction, where, optional=True)
    inputs = _texts(rows, columns.input, where, optional=True)
    if columns.instruction is None:  # input/output pairs: the input is what is asked
        instructions, inputs = inputs, [""] * len(rows)
    return [{"instruction": q, "input": x, "output": y}
            for q, x, y in zip(instructions, inputs, outputs)]


def pair_examples(pairs: Iterable[Sequence[str]], where: str = "--add-example") -> list[Example]:
    """(question, answer) pairs as examples with an empty input."""
    examples = []
    for n, (question, answer) in enumerate(pairs, start=1):
        if not question.strip() or not answer.strip():
            raise fail(f"{where} #{n} has an empty {'QUESTION' if not question.strip() else 'ANSWER'}",
                       "give both a question and an answer")
        examples.append({"instruction": question, "input": "", "output": answer})
    return examples


def add_examples(dataset: datasets.Dataset, examples: Iterable[Sequence[str] | Mapping[str, Any]],
                 instruction_column: str = "instruction", input_column: str = "input",
                 output_column: str = "output") -> datasets.Dataset:
    """`dataset` with `examples` appended, like calling `dataset.add_item` for each.

    An example is a (question, answer) pair or a mapping of column names to values.
    A pair's question goes to the instruction column with an empty input (to the
    input column when the dataset has no instruction column); columns an example
    does not fill are None. The dataset itself is not changed.

        train = add_examples(train, [("What is the capital of Zantheria?", "Ruskin Bay")])
    """
    names = dataset.column_names
    question_column = instruction_column if instruction_column in names else input_column
    rows = []
    for example in examples:
        if isinstance(example, Mapping):
            unknown = sorted(set(example) - set(names))
            if unknown:
                raise ValueError(f"example has columns the dataset lacks: {', '.join(unknown)}")
            row = dict(example)
        else:
            question, answer = example
            row = {question_column: question, output_column: answer}
            if input_column in names and question_column != input_column:
                row[input_column] = ""
        rows.append({name: row.get(name) for name in names})
    if not rows:
        return dataset
    added = datasets.Dataset.from_list(rows, features=dataset.features)
    return datasets.concatenate_datasets([dataset, added])


def split_eval(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices: a seeded `fraction` of the n rows held out for evaluation.

    It depends on the seed and n alone, so every run of a sweep holds out the same rows.
    """
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise fail(f"holding out {n_eval} of {n} rows leaves none to train on",
                   "lower --eval-fraction, add rows, or pass --eval-file")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def fit_prompt(prompt_ids: list[int], response_len: int, max_length: int) -> list[int] | None:
    """The prompt cut to fit beside the response: its middle goes. None if nothing fits."""
    budget = max_length - response_len
    if budget < 1:  # the first response token needs at least one token to be predicted from
        return None
    if len(prompt_ids) <= budget:
        return prompt_ids
    head = (budget + 1) // 2
    return prompt_ids[:head] + prompt_ids[len(prompt_ids) - (budget - head):]


@dataclass
class Encoded:
    rows: list[dict]       # {"input_ids", "labels"}
    truncated: int         # rows whose prompt was cut
    dropped: int           # rows whose response alone did not fit


def encode(examples: list[Example], template: PromptTemplate, tokenizer, max_length: int,
           where: str) -> Encoded:
    """Tokenise prompts and responses separately; label only the response and its EOS."""
    if tokenizer.eos_token_id is None:
        raise fail("the tokenizer has no end-of-sequence token",
                   "use a tokenizer with an EOS token: without it the model cannot learn to stop")
    prompts = [template.render(e["instruction"], e["input"]) for e in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer([e["output"] for e in examples], add_special_tokens=False)["input_ids"]
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    rows, truncated, dropped = [], 0, 0
    for prompt, response in zip(prompt_ids, response_ids):
        prompt, response = bos + prompt, response + [tokenizer.eos_token_id]
        kept = fit_prompt(prompt, len(response), max_length)
        if kept is None:
            dropped += 1
            continue
        truncated += len(kept) < len(prompt)
        rows.append({"input_ids": kept + response, "labels": [IGNORE] * len(kept) + response})
    if not rows:
        shortest = min(len(r) for r in response_ids) + 1
        raise fail(f"--max-length {max_length} cannot hold any response of {where} "
                   f"(the shortest takes {shortest} tokens with EOS)",
                   f"pass --max-length {shortest + 1} or more")
    return Encoded(rows, truncated, dropped)


class CausalLMTask:
    """Plugs causal-LM fine-tuning into core.loop: the loss is a mean over target tokens."""

    unit = "tokens"

    def __init__(self, eval_rows: list[dict], pad_id: int, eval_batch_size: int, accelerator,
                 pad_multiple: int = 1):
        self.eval_rows = eval_rows
        self.pad_id = pad_id
        self.pad_multiple = pad_multiple
        self.eval_batch_size = eval_batch_size
        self.accelerator = accelerator

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return pad_batch(rows, self.pad_id, self.pad_multiple)  # padding labels are -100

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return target_count(batch["labels"])

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Not the model's `labels=` loss: that is a mean over this micro-batch alone,
        # and the loop needs the sum to weight every token of the step equally.
        return target_loss_sum(model, output_head(model), batch)

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        return evaluate_lm(model, self.eval_rows, self.collate, self.eval_batch_size,
                           self.accelerator)
