"""Bad input to train_lora.py: one line on stderr, exit 2, and no file written."""

import json

import pytest

import train_lora
from core.errors import run_cli

GOOD = {"instruction": "Name a colour.", "input": "", "output": "Teal"}
CHAT = {"messages": [{"role": "user", "content": "Name a colour."},
                     {"role": "assistant", "content": "Teal"}]}


def write_rows(path, rows):
    """Rows as JSON lines; strings as lines of text."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


CASES = {
    "missing output column": (
        lambda d: ["--train-file", write_rows(d / "a.jsonl", [{"instruction": "Hi", "answer": "Yo"}] * 20)],
        "column 'output' not found"),
    "no prompt column": (
        lambda d: ["--train-file", write_rows(d / "b.jsonl", [{"question": "Hi", "output": "Yo"}] * 20)],
        "neither an 'instruction' nor an 'input' column"),
    "named column absent": (
        lambda d: ["--instruction-column", "prompt"], "column 'prompt' not found"),
    "empty output": (
        lambda d: ["--train-file", write_rows(d / "c.jsonl", [GOOD] * 20 + [{**GOOD, "output": ""}])],
        "row 20 of the training data has an empty 'output'"),
    "template without input": (
        lambda d: ["--prompt-template", "Q: {instruction}\\nA:"], "lacks the placeholder(s) {input}"),
    "template with unknown placeholder": (
        lambda d: ["--prompt-template", "{instruction} {input} {context}"],
        "unknown placeholder(s) {context}"),
    "target module matching nothing": (
        lambda d: ["--target-modules", "q_proj", "qkv_proj"], "qkv_proj match(es) no layer"),
    "rank zero": (lambda d: ["--lora-r", "4", "0"], "--lora-r must be positive"),
    "duplicate ranks": (lambda d: ["--lora-r", "8", "4", "8"], "lists a rank twice"),
    "max length too small": (lambda d: ["--max-length", "2"], "cannot hold any response"),
    "eval fraction out of range": (lambda d: ["--eval-fraction", "1.5"], "--eval-fraction must be"),
    "missing extra examples file": (
        lambda d: ["--extra-examples", str(d / "none.jsonl")], "data file not found"),
    "empty added answer": (lambda d: ["--add-example", "Who?", " "], "#1 has an empty ANSWER"),
    "added example too long": (
        lambda d: ["--max-length", "32", "--add-example", "Who?", "Teal " * 40],
        "--max-length 32 cannot hold any response of --add-example #1"),
    "added chat example too long": (
        lambda d: ["--train-file", write_rows(d / "ch.jsonl", [CHAT] * 20), "--max-length", "40",
                   "--add-example", "Who?", "Teal " * 40],
        "cannot hold the last exchange of any conversation of --add-example #1"),
    "extra example too long": (
        lambda d: ["--max-length", "32", "--extra-examples",
                   write_rows(d / "x.jsonl", [GOOD, {**GOOD, "output": "Teal " * 40}])],
        "cannot hold any response of --extra-examples"),
    "added example without answer": (
        lambda d: ["--add-example", "Who?"], "expected 2 arguments"),
    "resume from a path": (
        lambda d: ["--resume-from", str(d)], "a sweep resumes each rank from its own directory"),
    "resume with nothing to resume": (lambda d: ["--resume-from", "latest"], "nothing to resume"),
    "fp16 on a CPU": (lambda d: ["--mixed-precision", "fp16"], "is not available here"),
    "4-bit and 8-bit at once": (lambda d: ["--load-in-4bit", "--load-in-8bit"],
                                "--load-in-4bit and --load-in-8bit both given"),
    "a quantised base under --fsdp": (lambda d: ["--load-in-4bit", "--fsdp"],
                                      "--fsdp with --load-in-4bit is not supported"),
    "eval split of a local file": (  # the demo reads a local --train-file
        lambda d: ["--eval-split", "validation"], "--eval-split names a split of --dataset"),
    "messages cell not a list": (
        lambda d: ["--train-file", write_rows(d / "m1.jsonl", [{"messages": "Hi there"}] * 20)],
        "row 0 of the training data has a str in column 'messages', not a list of role/content"),
    "unknown role": (
        lambda d: ["--train-file", write_rows(d / "m2.jsonl", [CHAT] * 19 + [{"messages": [
            {"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}])],
        "row 19 of the training data: message 0 has the unknown role 'robot'"),
    "conversation without an assistant turn": (
        lambda d: ["--train-file", write_rows(d / "m3.jsonl", [CHAT] * 19 + [{"messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}])],
        "row 19 of the training data has no assistant turn"),
    "messages beside instruction columns": (
        lambda d: ["--train-file", write_rows(d / "m4.jsonl", [{**GOOD, **CHAT}] * 20)],
        "has a 'messages' column and instruction columns (instruction, input, output)"),
    "named messages column absent": (
        lambda d: ["--train-file", write_rows(d / "m5.jsonl", [CHAT] * 20),
                   "--messages-column", "turns"], "column 'turns' not found"),
    "chat template without an end-of-turn token": (
        lambda d: ["--train-file", write_rows(d / "m6.jsonl", [CHAT] * 20), "--chat-template",
                   write_rows(d / "t.jinja", ["{% for m in messages %}{{ m['role'] }}: "
                                              "{{ m['content'] }}\n\n{% endfor %}"])],
        "not with a special token of the tokenizer"),
    "missing chat template file": (
        lambda d: ["--train-file", write_rows(d / "m7.jsonl", [CHAT] * 20), "--chat-template",
                   str(d / "none.jinja")], "cannot read --chat-template"),
    "chat template for instruction rows": (
        lambda d: ["--chat-template", "chatml"], "--chat-template renders conversations"),
    "prompt template for conversations": (
        lambda d: ["--train-file", write_rows(d / "m8.jsonl", [CHAT] * 20), "--prompt-template",
                   "Q: {instruction} {input}\\nA:"], "--prompt-template renders instruction rows"),
    "empty sample prompt": (lambda d: ["--sample-prompt", " "], "a --sample-prompt is empty"),
    "missing sample prompts file": (
        lambda d: ["--sample-prompts", str(d / "none.txt")], "--sample-prompts file not found"),
    "sample prompts file without prompts": (
        lambda d: ["--sample-prompts", write_rows(d / "p.txt", ["", " "])], "holds no prompt"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    extra_argv, words = CASES[case]
    out = tmp_path / "run"
    argv = ["--demo", "--output-dir", str(out), *extra_argv(tmp_path)]
    assert run_cli(train_lora.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert words in err[0]
    assert " — " in err[0]  # what is wrong, then how to fix it
    assert not out.exists()
