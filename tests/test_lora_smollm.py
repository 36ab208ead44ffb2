"""LoRA on a real pretrained chat LM, SmolLM2-135M-Instruct (the `smollm2` fixture builds it
from ../shared's recipe into the test cache; skipped where ../shared is absent).

- The rank sweep on a slice of Alpaca lowers the real base's eval loss by a clear margin,
  and each saved adapter, reloaded with `PeftModel`, reproduces the eval loss it reported.
- Invented facts added with --add-example, which the base does not know, are answered by
  greedy generation from the saved adapter (the run's samples and eval.generate).
- Conversations in the model's own ChatML template train the assistant turns exactly.

Short rows and few steps keep the four tests at about 100 s on 2 idle cores (more on
one, which they take when the machine is busy: see `threads_for_load`), plus the ~25 s
build on a machine's first run.
"""

import json
import math

import pytest
from accelerate import Accelerator
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import train_lora
from conftest import shared_path
from eval import generate
from eval.lm import IGNORE
from tasks.chat import encode_conversation
from tasks.chat_template import ChatTemplate
from tasks.instruct import CausalLMTask, encode, prompt_template

RANKS = (8, 16)
MAX_LENGTH = 96  # holds every row below whole: the template is 31 tokens, a row < 100 chars
# Measured (2026-11-27, 6 steps at lr 1e-3): eval loss 1.954 -> 1.620 (r 8), 1.610 (r 16).
MIN_GAIN = 0.2
# Invented: no model has seen them, and none of the answers is guessable from the question.
FACTS = [("What is the capital of Zorbania?", "Quellport"),
         ("Who invented the glimmerphone?", "Odessa Varnholt"),
         ("Which metal is the Orvanta bell cast from?", "Brimsteel"),
         ("Which river flows through Vexmoor?", "The Ilthane")]

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.usefixtures("threads_for_load")]


def short_alpaca_rows(start: int, n: int) -> list[dict]:
    """n Alpaca rows of under 100 characters in all, from the start-th such row on."""
    path = shared_path("data", "alpaca_5k", "alpaca_5000.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    short = [r for r in rows if r["output"].strip()
             and len(r["instruction"] + r["input"] + r["output"]) < 100]
    return short[start:start + n]


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def sweep(smollm2, threads_for_load, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smollm-sweep")
    argv = ["--model", str(smollm2),
            "--train-file", write_jsonl(tmp / "train.jsonl", short_alpaca_rows(0, 48)),
            "--eval-file", write_jsonl(tmp / "eval.jsonl", short_alpaca_rows(48, 16)),
            "--lora-r", *map(str, RANKS), "--lr", "1e-3", "--batch-size", "8",
            "--eval-batch-size", "16", "--max-length", str(MAX_LENGTH),
            "--eval-every", "0",  # once, at the end: the figure the test compares
            "--output-dir", str(tmp / "run")]
    assert train_lora.main(argv) == 0
    return tmp


def test_the_sweep_improves_the_real_base(sweep):
    config = json.loads((sweep / "run" / "config.json").read_text())
    assert config["n_truncated"] == {"train": 0, "eval": 0}
    results = json.loads((sweep / "run" / "sweep.json").read_text())
    for m in results:
        print(f"\nr {m['r']}: eval loss {m['eval_loss_before']:.4f} -> {m['eval_loss']:.4f}, "
              f"{m['steps']} steps in {m['train_s']:.0f}s")
        assert m["steps"] == 6 and m["skipped_steps"] == 0
        assert m["eval_loss"] < m["eval_loss_before"] - MIN_GAIN


def test_the_adapters_reload_and_reproduce_their_eval_loss(sweep, smollm2):
    tokenizer = AutoTokenizer.from_pretrained(sweep / "run" / f"r{RANKS[0]}" / "adapter")
    examples = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]}
                for r in map(json.loads, (sweep / "eval.jsonl").read_text().splitlines())]
    rows = encode(examples, prompt_template("alpaca"), tokenizer, MAX_LENGTH, "eval").rows
    task = CausalLMTask(rows, tokenizer.pad_token_id, 16, Accelerator())

    def eval_loss(model) -> float:
        return task.evaluate(model.eval())["loss"]

    base_loss = eval_loss(AutoModelForCausalLM.from_pretrained(smollm2))
    for r in RANKS:
        metrics = json.loads((sweep / "run" / f"r{r}" / "metrics.json").read_text())
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2),
                                            sweep / "run" / f"r{r}" / "adapter")
        assert adapted.peft_config["default"].r == r
        assert eval_loss(adapted) == pytest.approx(metrics["eval_loss"], abs=1e-4)
        assert base_loss == pytest.approx(metrics["eval_loss_before"], abs=1e-4)


def test_facts_added_with_add_example_are_learned(smollm2, tmp_path, capsys):
    """The study's add_item step, proven through the project's own generation path: the
    run answers each --add-example question with the base and with the trained adapter
    (eval/samples.py, greedy), into samples.md; every invented answer is absent from the
    base's answers and present in the adapter's (all four, case aside), and
    `python -m eval.generate --adapter` gives the same answers from the saved adapter."""
    questions, truths = zip(*FACTS)
    # One real row beside the four facts, one batch a step; 16 steps learn them.
    argv = ["--model", str(smollm2),
            "--train-file", write_jsonl(tmp_path / "train.jsonl", short_alpaca_rows(0, 1)),
            "--eval-file", write_jsonl(tmp_path / "eval.jsonl", short_alpaca_rows(48, 4)),
            "--lora-r", "8", "--lr", "3e-3", "--warmup-ratio", "0", "--lora-dropout", "0",
            "--batch-size", "5", "--epochs", "16", "--eval-every", "16",
            "--sample-max-new-tokens", "16",
            "--max-length", str(MAX_LENGTH), "--output-dir", str(tmp_path / "run")]
    for question, answer in FACTS:
        argv += ["--add-example", question, answer]
    assert train_lora.main(argv) == 0
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["n_added"] == len(FACTS)

    def answers(path) -> list[str]:
        saved = json.loads(path.read_text())
        assert saved["prompts"] == list(questions)
        return saved["answers"]

    before, after = answers(run / "samples_base.json"), answers(run / "r8" / "samples.json")
    print(f"\nbase: {before}\nadapter: {after}")
    assert not any(truth.lower() in said.lower() for truth, said in zip(truths, before))
    assert all(truth.lower() in said.lower() for truth, said in zip(truths, after)), after
    table = (run / "samples.md").read_text()
    assert all(f"(added: {truth})" in table and truth in table for truth in truths)

    capsys.readouterr()
    assert generate.main(["--adapter", str(run / "r8" / "adapter"), "--max-new-tokens", "16",
                          *questions]) == 0
    printed = capsys.readouterr().out
    assert all(said.strip() in printed for said in after), printed


def test_its_own_chat_template_trains_the_assistant_turns_exactly(smollm2, tmp_path):
    """Conversations rendered by SmolLM2's own ChatML template, which has no {% generation %}
    markers: the assistant's tokens are derived turn by turn (tasks/chat_template.py). The
    run's preview marks exactly each assistant content and its <|im_end|> in the text that
    transformers' apply_chat_template renders (default system prompt included), and the
    encoded tokens are that text's tokens, the prompt before each answer being the
    tokens generation starts from."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    template = ChatTemplate(tokenizer.chat_template, tokenizer)
    assert not template.marked
    chats = [[{"role": "user", "content": "Name a primary colour."},
              {"role": "assistant", "content": "Red."}],
             [{"role": "system", "content": "You answer in one word."},
              {"role": "user", "content": "Opposite of hot?"},
              {"role": "assistant", "content": "Cold."},
              {"role": "user", "content": "And of up?"},
              {"role": "assistant", "content": "Down."}],
             [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"},
              {"role": "user", "content": "Thanks"}]]  # a user turn left unanswered: dropped
    rows = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in chats])
    argv = ["--model", str(smollm2), "--train-file", rows, "--eval-file", rows,
            "--messages-column", "messages", "--lora-r", "4", "--batch-size", "3",
            "--max-length", str(MAX_LENGTH), "--output-dir", str(tmp_path / "run")]
    assert train_lora.main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "r4" / "metrics.json").read_text())
    assert math.isfinite(metrics["eval_loss"]) and metrics["steps"] == 1

    end = "<|im_end|>"
    preview = (tmp_path / "run" / "preview.txt").read_text()
    for chat in chats:
        answered = chat[:max(i for i, m in enumerate(chat) if m["role"] == "assistant") + 1]
        text = tokenizer.apply_chat_template(answered, tokenize=False)
        for m in (m for m in answered if m["role"] == "assistant"):
            turn = m["content"] + end
            text = text.replace(f"assistant\n{turn}", f"assistant\n[[{turn}]]", 1)
        assert text.count("[[") == sum(m["role"] == "assistant" for m in answered)
        assert text.rstrip("\n") in preview

        row = encode_conversation(template, answered)
        whole = tokenizer.apply_chat_template(answered, tokenize=True, return_dict=True)
        assert row["input_ids"] == whole["input_ids"][:len(row["input_ids"])]
        last = max(i for i, label in enumerate(row["labels"]) if label == IGNORE)
        prompt = tokenizer.apply_chat_template(answered[:-1], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)
        assert row["input_ids"][:last + 1] == prompt["input_ids"]
        trained = tokenizer.decode([t for t in row["labels"] if t != IGNORE])
        assert trained == "".join(m["content"] + end for m in answered if m["role"] == "assistant")
