"""LoRA training: the token loss contract, frozen base weights, adapter save/load, tokenizers."""

import copy
import json

import pytest
import torch
from accelerate import Accelerator
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, SentencePieceBackend

import train_lora
from core.collate import pad_batch
from core.demo import data_file, sentencepiece_tokenizer_dir, tiny_llama_config
from core.loop import TrainData, train
from tasks.instruct import CausalLMTask

VOCAB = 97
TARGETS = ["q_proj", "v_proj", "down_proj"]


def lora_model(seed: int = 0, r: int = 4):
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(tiny_llama_config(VOCAB))
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                            lora_dropout=0.0))
    with torch.no_grad():  # B starts at zero; give the adapter something to say
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return model


def rows(n: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (4 + 5 * (i % 4),), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_micro_batches_give_the_gradients_of_one_big_batch():
    # Compared as gradients, not as weights after a step: Adam's first update is
    # about lr * sign(gradient), which would hide a mis-weighted loss.
    model = lora_model()
    task = CausalLMTask([], pad_id=0, eval_batch_size=4, accelerator=None)
    data = rows(9)
    micro = [task.collate(data[i:i + 3]) for i in (0, 3, 6)]  # padded to unequal widths
    assert len({b["input_ids"].shape[1] for b in micro}) > 1
    total = sum(task.count(b) for b in micro)
    for batch in micro:  # the loop's contract: each micro-batch adds sum / all units
        (task.loss_sum(model, batch) / total).backward()
    accumulated = lora_grads(model)
    model.zero_grad()
    whole = task.collate(data)
    (task.loss_sum(model, whole) / task.count(whole)).backward()
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(accumulated[name], grad, msg=name)


def train_cfg(tmp_path, **changes):
    cfg = train_lora.LoraRunConfig(demo=True, output_dir=str(tmp_path), batch_size=4,
                                   eval_batch_size=8, max_steps=3, lr=1e-2, warmup_ratio=0.0,
                                   group_by_length=False, log_every=1)
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_moves_only_the_adapter(tmp_path, checkpointing):
    model = lora_model()
    if checkpointing:
        model.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = CausalLMTask(rows(4, seed=1), 0, 8, Accelerator())
    data = TrainData(rows(16), task.collate)
    result = train(model, task, data, train_cfg(tmp_path), Accelerator(), tmp_path)
    assert result["steps"] == 3
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad and not torch.equal(param, before[name]), name
        else:
            assert not param.requires_grad, name
            assert torch.equal(param, before[name]), name


def test_saved_adapter_reloads_with_identical_logits(tmp_path):
    model = lora_model().eval()
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_llama_config(VOCAB))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    batch = pad_batch(rows(3), 0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_merged_model_agrees_with_base_plus_adapter():
    model = lora_model().eval()
    batch = pad_batch(rows(3), 0)
    with torch.no_grad():
        adapted = model(**batch).logits
        merged = copy.deepcopy(model).merge_and_unload()(**batch).logits
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["q_proj", "embed_tokens"]])
def test_merging_into_tied_embeddings_keeps_the_other_side(tmp_path, targets):
    # A tied base holds one matrix for the input embeddings and lm_head; merging an
    # adapter of either into it changed both, and the merged model answered otherwise.
    from core.demo import bpe_tokenizer
    from tasks.lora_model import save_merged
    torch.manual_seed(0)
    config = tiny_llama_config(VOCAB)
    config.tie_word_embeddings = True
    base = AutoModelForCausalLM.from_config(config)
    embeddings = base.get_input_embeddings().weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # B, and an embedding's A, start at zero
                param.normal_(std=0.05)
    model.eval()
    batch = pad_batch(rows(3), 0)
    with torch.no_grad():
        adapted = model(**batch).logits
    save_merged(model, "unused", torch.float32, bpe_tokenizer(["a b c"] * 4), tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted, rtol=0, atol=1e-5)
    if targets[-1] == "lm_head":  # the input side as the base had it
        assert torch.equal(merged.get_input_embeddings().weight, embeddings)


@pytest.fixture(scope="module")
def open_llama_dir(tmp_path_factory):
    texts = [json.loads(line)["output"] for line in open(data_file("qa.jsonl"))]
    return sentencepiece_tokenizer_dir(texts, tmp_path_factory.mktemp("m") / "tiny_open_llama")


def test_open_llama_models_get_the_sentencepiece_tokenizer(open_llama_dir):
    import sentencepiece as spm
    cfg = train_lora.LoraRunConfig(model=str(open_llama_dir))
    assert train_lora.use_slow_tokenizer(cfg)
    tokenizer = train_lora.load_tokenizer(cfg, [])
    assert isinstance(tokenizer, SentencePieceBackend)
    text = "Reverse the order of these words.\n### Response:"
    processor = spm.SentencePieceProcessor(model_file=str(open_llama_dir / "tokenizer.model"))
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == processor.encode(text)
    # LLaMA's files have no pad token: padding borrows <unk> (its labels are -100 anyway).
    assert tokenizer.pad_token == "<unk>" and tokenizer.eos_token_id == 2


def test_slow_tokenizer_is_a_flag_and_off_for_other_models():
    assert not train_lora.use_slow_tokenizer(train_lora.LoraRunConfig(model="gpt2"))
    assert train_lora.use_slow_tokenizer(
        train_lora.LoraRunConfig(model="gpt2", slow_tokenizer=True))
    assert not train_lora.use_slow_tokenizer(
        train_lora.LoraRunConfig(model="open_llama_7b", slow_tokenizer=False))


def test_added_examples_come_from_flags_and_config_files(tmp_path):
    from core.config import parse_config
    config = tmp_path / "c.yaml"
    config.write_text("add_example: [['What is 2+2?', '4']]\nlora_r: [4, 8]\n")
    cfg = parse_config(train_lora.LoraRunConfig,
                       ["--config", str(config), "--add-example", "Capital of Zantheria?",
                        "Ruskin Bay"], "")
    assert cfg.add_example == [["What is 2+2?", "4"], ["Capital of Zantheria?", "Ruskin Bay"]]
    assert cfg.lora_r == [4, 8] and [cfg.alpha(r) for r in cfg.lora_r] == [8, 16]
