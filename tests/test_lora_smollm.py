"""LoRA on a real pretrained chat LM, SmolLM2-135M-Instruct (the `smollm2` fixture builds it
from ../shared's recipe into the test cache; skipped where ../shared is absent).

- The rank sweep on a slice of Alpaca lowers the real base's eval loss by a clear margin,
  and each saved adapter, reloaded with `PeftModel`, reproduces the eval loss it reported.
- Invented facts added with --add-example, which the base does not know, are answered by
  greedy generation from the saved adapter.

Short rows and few steps keep the three tests at about 95 s on 2 idle cores (155 s on
one, which they take when the machine is busy: see `threads_for_load`), plus the ~25 s
build on a machine's first run.
"""

import json

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import train_lora
from conftest import shared_path
from eval.lm import IGNORE
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


def greedy_answers(model, tokenizer, questions: list[str]) -> list[str]:
    """Each question in the training prompt (tasks.instruct's own rendering, BOS included),
    answered greedily until EOS or 16 tokens."""
    rows = encode([{"instruction": q, "input": "", "output": "-"} for q in questions],
                  prompt_template("alpaca"), tokenizer, MAX_LENGTH, "questions").rows
    answers = []
    for row in rows:
        prompt = torch.tensor([[t for t, label in zip(row["input_ids"], row["labels"])
                                if label == IGNORE]])
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=16, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True))
    return answers


def test_facts_added_with_add_example_are_learned(smollm2, tmp_path):
    """The study's add_item step, proven: every invented answer is absent from the base's
    greedy answer and present in the adapter's (all four, case aside)."""
    questions, truths = zip(*FACTS)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    before = greedy_answers(AutoModelForCausalLM.from_pretrained(smollm2).eval(), tokenizer,
                            list(questions))
    print(f"\nbase: {before}")
    assert not any(truth.lower() in said.lower() for truth, said in zip(truths, before))

    # One real row beside the four facts, one batch a step; 16 steps learn them.
    argv = ["--model", str(smollm2),
            "--train-file", write_jsonl(tmp_path / "train.jsonl", short_alpaca_rows(0, 1)),
            "--eval-file", write_jsonl(tmp_path / "eval.jsonl", short_alpaca_rows(48, 4)),
            "--lora-r", "8", "--lr", "3e-3", "--warmup-ratio", "0", "--lora-dropout", "0",
            "--batch-size", "5", "--epochs", "16", "--eval-every", "16",
            "--max-length", str(MAX_LENGTH), "--output-dir", str(tmp_path / "run")]
    for question, answer in FACTS:
        argv += ["--add-example", question, answer]
    assert train_lora.main(argv) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["n_added"] == len(FACTS)

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2),
                                        tmp_path / "run" / "r8" / "adapter").eval()
    after = greedy_answers(adapted, tokenizer, list(questions))
    print(f"adapter: {after}")
    assert all(truth.lower() in said.lower() for truth, said in zip(truths, after)), after
