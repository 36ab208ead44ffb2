"""train_lora.py end to end: a two-rank sweep on a tiny OpenLLaMA-shaped model, and the demo."""

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, SentencePieceBackend

import train_lora
from core.collate import pad_batch
from core.demo import data_file, sentencepiece_tokenizer_dir, tiny_llama_config
from core.errors import run_cli
from eval import generate

RANKS = (2, 4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama saved with a sentencepiece tokenizer, named like OpenLLaMA."""
    rows = [json.loads(line) for line in open(data_file("qa.jsonl"))]
    path = sentencepiece_tokenizer_dir([r["instruction"] + " " + r["output"] for r in rows],
                                       tmp_path_factory.mktemp("models") / "tiny_open_llama")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config(600, max_length=256)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sweep(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    extra = tmp / "extra.jsonl"
    extra.write_text(json.dumps({"instruction": "Name the shop.", "output": "Lumen"}) + "\n")
    out = tmp / "run"
    argv = ["--model", str(model_dir), "--train-file", data_file("qa.jsonl"),
            "--max-train-samples", "120", "--lora-r", *map(str, RANKS), "--max-steps", "4",
            "--batch-size", "8", "--lr", "1e-3", "--max-length", "192", "--merge",
            "--add-example", "Who keeps the lighthouse?", "Mara",
            "--add-example", "What colour is the door?", "Teal",
            "--extra-examples", str(extra), "--output-dir", str(out)]
    assert train_lora.main(argv) == 0
    return out


def test_every_file_of_the_sweep_is_written(sweep):
    for name in ("config.json", "loss_vs_r.png", "sweep.md", "sweep.json"):
        assert (sweep / name).is_file(), name
    for r in RANKS:
        for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                     "adapter/tokenizer.model", "train_log.jsonl", "metrics.json",
                     "merged/config.json"):
            assert (sweep / f"r{r}" / name).is_file(), f"r{r}/{name}"


def test_metrics_and_table_cover_every_rank(sweep):
    results = json.loads((sweep / "sweep.json").read_text())
    assert [m["r"] for m in results] == list(RANKS)
    for m in results:
        assert m == json.loads((sweep / f"r{m['r']}" / "metrics.json").read_text())
        for key in ("eval_loss", "perplexity", "train_loss", "trainable_params", "total_params",
                    "train_tokens_per_s", "train_s"):
            assert key in m
        assert m["lora_alpha"] == 2 * m["r"]  # alpha/r stays 2 across the sweep
        assert m["perplexity"] == pytest.approx(2.718281828 ** m["eval_loss"], rel=1e-6)
    # Same held-out rows and the same starting model for every rank.
    assert len({m["n_eval_tokens"] for m in results}) == 1
    assert len({m["eval_loss_before"] for m in results}) == 1
    assert results[1]["trainable_params"] == 2 * results[0]["trainable_params"]
    table = (sweep / "sweep.md").read_text()
    assert all(f"| {r} | {2 * r} |" in table for r in RANKS)


def test_config_records_the_added_examples_and_the_split(sweep):
    config = json.loads((sweep / "config.json").read_text())
    assert config["n_added"] == 3
    assert config["n_eval"] == 6  # 5% of the 120 rows, held out before the additions
    assert config["n_train"] == 114 + 3
    assert config["slow_tokenizer"] is True
    assert config["add_example"] == [["Who keeps the lighthouse?", "Mara"],
                                     ["What colour is the door?", "Teal"]]


def test_each_rank_logs_every_step(sweep):
    for r in RANKS:
        records = [json.loads(line) for line in open(sweep / f"r{r}" / "train_log.jsonl")]
        assert [x["step"] for x in records if x["type"] == "train"] == [1, 2, 3, 4]


def test_adapter_loads_and_agrees_with_the_merged_model(sweep, model_dir):
    adapter = sweep / "r4" / "adapter"
    tokenizer = SentencePieceBackend.from_pretrained(adapter)
    ids = tokenizer(["Who keeps the lighthouse?", "Name the shop."], add_special_tokens=False)
    batch = pad_batch([{"input_ids": x} for x in ids["input_ids"]], tokenizer.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    adapted = PeftModel.from_pretrained(base, adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(sweep / "r4" / "merged").eval()
    with torch.no_grad():
        expected = adapted(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()(**batch).logits
    assert not torch.allclose(plain, expected)  # the adapter did learn something


def test_samples_answer_the_added_examples_before_and_after(sweep):
    samples = (sweep / "samples.md").read_text()
    assert "| prompt | base | r=2 | r=4 |" in samples
    assert "| Who keeps the lighthouse? (added: Mara) |" in samples
    assert "| What colour is the door? (added: Teal) |" in samples
    for path in (sweep / "samples_base.json", sweep / "r2" / "samples.json"):
        assert json.loads(path.read_text())["prompts"] == ["Who keeps the lighthouse?",
                                                           "What colour is the door?"]


def test_generate_asks_the_adapter_as_the_run_did(sweep, capsys):
    """The run's Alpaca template, its sentencepiece tokenizer and its --model base, from
    config.json: greedy, the CLI gives the answer samples.json holds."""
    expected = json.loads((sweep / "r4" / "samples.json").read_text())["answers"][0]
    capsys.readouterr()
    assert generate.main(["--adapter", str(sweep / "r4" / "adapter"), "--max-new-tokens", "64",
                          "Who keeps the lighthouse?"]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_refuses_to_overwrite_the_sweep(sweep, model_dir, capsys):
    before = (sweep / "sweep.json").stat().st_mtime_ns
    argv = ["--model", str(model_dir), "--train-file", data_file("qa.jsonl"),
            "--output-dir", str(sweep)]
    assert run_cli(train_lora.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0]
    assert (sweep / "sweep.json").stat().st_mtime_ns == before


def test_demo_adapters_load_onto_the_saved_tiny_base(tmp_path):
    out = tmp_path / "demo"
    assert train_lora.main(["--demo", "--lora-r", "2", "--max-steps", "2",
                            "--max-train-samples", "80", "--output-dir", str(out)]) == 0
    config = json.loads((out / "r2" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(out / "base_model")
    assert "lm_head" in config["target_modules"]
    model = AutoPeftModelForCausalLM.from_pretrained(out / "r2" / "adapter")
    assert model.peft_config["default"].r == 2


def test_dora_trains_and_saves_its_magnitudes(tmp_path):
    out = tmp_path / "dora"
    assert train_lora.main(["--demo", "--use-dora", "--lora-r", "2", "--max-steps", "2",
                            "--max-train-samples", "40", "--no-preview", "--output-dir",
                            str(out)]) == 0
    assert json.loads((out / "r2" / "adapter" / "adapter_config.json").read_text())["use_dora"]
    weights = load_file(out / "r2" / "adapter" / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in name for name in weights)
    assert max(w.abs().max().item() for n, w in weights.items() if "lora_B" in n) > 0  # trained
    assert json.loads((out / "r2" / "metrics.json").read_text())["use_dora"] is True
    assert (out / "sweep.md").read_text().startswith("# LoRA rank sweep (DoRA)")
    model = AutoPeftModelForCausalLM.from_pretrained(out / "r2" / "adapter")
    assert model.peft_config["default"].use_dora


def test_every_rank_of_a_sweep_starts_from_the_same_loss_scale(tmp_path, cpu_amp, monkeypatch):
    """Issue #16, item 5: the sweep's one Accelerator kept its fp16 GradScaler across ranks,
    so a later rank started from the scale the previous one had reached."""
    cpu_amp(train_lora, "fp16", init_scale=2.0, growth_interval=1)  # doubles every good step
    scales = []
    real_train = train_lora.train

    def train(model, task, data, cfg, accelerator, out_dir, *rest):
        scales.append(accelerator.scaler.get_scale())
        result = real_train(model, task, data, cfg, accelerator, out_dir, *rest)
        scales.append(accelerator.scaler.get_scale())
        return result

    monkeypatch.setattr(train_lora, "train", train)
    assert train_lora.main(["--demo", "--lora-r", "2", "4", "--max-steps", "3",
                            "--max-train-samples", "64", "--mixed-precision", "fp16",
                            "--sample-max-new-tokens", "1", "--output-dir",
                            str(tmp_path / "out")]) == 0
    first_start, first_end, second_start, second_end = scales
    assert first_end != first_start  # training moved the scale: the test can tell
    assert second_start == first_start == 2.0 and second_end == first_end
