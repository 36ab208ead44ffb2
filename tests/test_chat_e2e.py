"""Conversations end to end: train_lora.py on multi-turn chat rows with system prompts, its
preview and samples, and `python -m eval.generate` on what it saved."""

import json

import pytest

import train_lora
from core.demo import bpe_tokenizer, data_file, tiny_llama_config
from eval import generate
from eval.preview import CLOSE, OPEN
from tasks.chat_template import named_template

QUESTION, ANSWER = "Who keeps the lighthouse?", "Mara"
SMALL = ["--lora-r", "2", "--max-steps", "2", "--max-train-samples", "40", "--batch-size", "8",
         "--sample-max-new-tokens", "6", "--add-example", QUESTION, ANSWER]
# A chat model's own template, as SmolLM2's: ChatML without {% generation %} marks.
OWN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, one_thread):
    """The demo's tiny Llama on the shipped conversations, with the shipped ChatML template."""
    out = tmp_path_factory.mktemp("chat") / "run"
    assert train_lora.main(["--demo", "--train-file", data_file("chat.jsonl"), "--merge",
                            "--output-dir", str(out), *SMALL]) == 0
    return out


def test_the_run_records_its_chat_template(chat_run):
    config = json.loads((chat_run / "config.json").read_text())
    assert config["data_format"] == "chat" and config["prompt_template_text"] is None
    assert config["chat_template_text"] == named_template("chatml", demo=False)
    assert config["n_added"] == 1
    # and the tokenizers saved with the adapter and the merged model carry it
    from transformers import AutoTokenizer
    for saved in ("adapter", "merged"):
        tokenizer = AutoTokenizer.from_pretrained(chat_run / "r2" / saved)
        assert tokenizer.chat_template == config["chat_template_text"], saved


def test_the_preview_marks_answers_and_their_end_of_turn_only(chat_run):
    preview = (chat_run / "preview.txt").read_text()
    answers = {m["content"] for line in open(data_file("chat.jsonl"))
               for m in json.loads(line)["messages"] if m["role"] == "assistant"}
    rows = preview.split("--- row ")[1:]
    assert len(rows) == 5
    for row in rows:
        head, text = row.split("\n", 1)
        n_tokens, n_trained = (int(w) for w in head.split(": ")[1].split() if w.isdigit())
        assert 0 < n_trained < n_tokens
        spans = [part.split(CLOSE)[0] for part in text.split(OPEN)[1:]]
        assert spans and all(s.endswith("<|im_end|>") and s[:-10] in answers for s in spans)
        assert "<|im_start|>assistant\n" + OPEN in text  # the header is not trained


def test_samples_show_the_added_question_before_and_after(chat_run, capsys):
    samples = (chat_run / "samples.md").read_text()
    assert "| prompt | base | r=2 |" in samples
    assert f"| {QUESTION} (added: {ANSWER}) |" in samples
    saved = json.loads((chat_run / "r2" / "samples.json").read_text())
    base = json.loads((chat_run / "samples_base.json").read_text())
    assert saved["prompts"] == base["prompts"] == [
        "What is the capital of Zantheria?", "Give the opposite of the word 'early'.", QUESTION]


@pytest.mark.parametrize("flag, path", [("--adapter", "adapter"), ("--model", "merged")])
def test_generate_answers_as_the_run_did(chat_run, flag, path, capsys):
    """The CLI finds the run's template and base; greedy, it answers as samples.json says."""
    expected = json.loads((chat_run / "r2" / "samples.json").read_text())["answers"][2]
    capsys.readouterr()
    assert generate.main([flag, str(chat_run / "r2" / path), "--max-new-tokens", "6",
                          QUESTION]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_chat_loop_keeps_the_conversation(chat_run, monkeypatch, capsys):
    lines, seen = iter(["What is the capital of Veloria?", "And of Lunessa?", ""]), []
    real = generate.generate_text

    def spy(model, fmt, messages, *args):
        seen.append([m["role"] for m in messages])
        return real(model, fmt, messages, *args)

    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    monkeypatch.setattr(generate, "generate_text", spy)
    assert generate.main(["--adapter", str(chat_run / "r2" / "adapter"), "--chat",
                          "--max-new-tokens", "4"]) == 0
    assert seen == [["user"], ["user", "assistant", "user"]]


def test_a_tokenizer_with_its_own_unmarked_template(tmp_path, one_thread):
    """A chat model's tokenizer brings its template: the mask is derived turn by turn."""
    from transformers import AutoModelForCausalLM
    rows = [json.loads(line)["messages"] for line in open(data_file("chat.jsonl"))]
    tokenizer = bpe_tokenizer([m["content"] for r in rows for m in r])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = OWN_TEMPLATE
    model_dir = tmp_path / "chat_model"
    config = tiny_llama_config(len(tokenizer), max_length=256)
    config.update({"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id})
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    assert train_lora.main(["--model", str(model_dir), "--train-file", data_file("chat.jsonl"),
                            "--max-length", "256", "--output-dir", str(out), *SMALL]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["chat_template_text"] == OWN_TEMPLATE
    rows = (out / "preview.txt").read_text().split("--- row ")[1:]
    # The template's own system prompt, where a conversation brings none.
    assert any("<|im_start|>system\nYou are helpful.<|im_end|>" in row for row in rows)
    spans = [s.split(CLOSE)[0] for row in rows for s in row.split(OPEN)[1:]]
    assert len(spans) >= len(rows) and all(s.endswith("<|im_end|>") for s in spans)
    assert QUESTION in (out / "samples.md").read_text()


@pytest.mark.parametrize("argv, words", [
    (["Hi"], "give either --adapter or --model"),
    (["--adapter", "a", "--model", "m", "Hi"], "give either --adapter or --model"),
    (["--model", "m"], "nothing to answer"),
    (["--model", "m", " "], "a prompt is empty"),
    (["--model", "m", "--max-new-tokens", "0", "Hi"], "--max-new-tokens must be positive"),
    (["--adapter", "{tmp}", "Hi"], "holds no LoRA adapter"),
    (["--model", "{tmp}/none", "Hi"], "cannot load tokenizer"),
])
def test_generate_refuses_bad_input_in_one_line(argv, words, tmp_path, capsys):
    from core.errors import run_cli
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert run_cli(generate.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and " — " in err[0], err
