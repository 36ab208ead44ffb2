"""bench.fits, README's "What fits where": its base and LoRA terms against the bytes a base
built by train_lora.py's own path holds (tasks.lora_model.build_lora_model, measured with
tasks.quantize.weight_bytes), base precision by base precision; and the README's table is
the one bench.fits prints."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from bench import fits
from tasks.lora_config import LoraRunConfig
from tasks.lora_model import base_dtype, build_lora_model
from tasks.quantize import weight_bytes

SHAPE = dict(h=512, m=1376, L=2, V=2000)
# base precision -> the run's flags
RUNS = {"fp32": {"mixed_precision": "no"}, "bf16": {"mixed_precision": "bf16"},
        "8bit": {"mixed_precision": "bf16", "load_in_8bit": True},
        "4bit": {"mixed_precision": "bf16", "load_in_4bit": True}}
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("fits") / "llama"
    config = LlamaConfig(hidden_size=SHAPE["h"], intermediate_size=SHAPE["m"],
                         num_hidden_layers=SHAPE["L"], vocab_size=SHAPE["V"],
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("base", list(RUNS))
def test_the_base_and_lora_terms_are_what_a_built_model_holds(saved, base):
    cfg = LoraRunConfig(model=str(saved), **RUNS[base])
    cpu = torch.device("cpu")  # the base's dtype as train_lora.py picks it
    model = build_lora_model(str(saved), 8, cfg, base_dtype(cpu, cfg.mixed_precision), cpu)
    # Within 0.5 %: the formula leaves out the quantisers' code tables (1 KiB a layer).
    assert fits.base_bytes(SHAPE, base) == pytest.approx(weight_bytes(model), rel=5e-3)
    assert fits.lora_params(SHAPE, 8) == model.get_nb_trainable_parameters()[0]


def test_the_readme_table_is_the_formulas():
    printed = fits.table(8, 8, 512).splitlines()
    text = README.read_text(encoding="utf-8").splitlines()
    start = text.index(printed[0])
    assert text[start:start + len(printed)] == printed
