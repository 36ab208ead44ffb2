"""bench.fits, README's "What fits where": its base and LoRA terms against the bytes a
built model holds (tasks.quantize.weight_bytes), base precision by base precision."""

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

from bench import fits
from tasks.quantize import weight_bytes

SHAPE = dict(h=512, m=1376, L=2, V=2000)
LOADS = {"fp32": dict(dtype=torch.float32), "bf16": dict(dtype=torch.bfloat16),
         "8bit": dict(quantization_config=BitsAndBytesConfig(load_in_8bit=True)),
         "4bit": dict(quantization_config=BitsAndBytesConfig(
             load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("fits") / "llama"
    config = LlamaConfig(hidden_size=SHAPE["h"], intermediate_size=SHAPE["m"],
                         num_hidden_layers=SHAPE["L"], vocab_size=SHAPE["V"],
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("base", list(LOADS))
def test_the_base_term_is_what_the_loaded_base_holds(saved, base):
    from peft import prepare_model_for_kbit_training
    model = AutoModelForCausalLM.from_pretrained(saved, device_map={"": "cpu"}, **LOADS[base])
    if base.endswith("bit"):  # as train_lora.py prepares it: the rest upcast to fp32
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.requires_grad_(False)
    # Within 0.5 %: the formula leaves out the quantisers' code tables (1 KiB a layer).
    assert fits.base_bytes(SHAPE, base) == pytest.approx(weight_bytes(model), rel=5e-3)


def test_the_lora_term_counts_the_adapters_weights(saved):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(saved), LoraConfig(
        r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj"]))
    assert fits.lora_params(SHAPE, 8) == model.get_nb_trainable_parameters()[0]
