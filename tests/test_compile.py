"""--compile: the compiled model trains like the eager one (dropout off, so no RNG differs)."""

import json

import pytest
import torch
from accelerate import Accelerator

from core.config import TrainConfig
from core.loop import TrainData, train
from tasks.classification import ClassificationTask
from tests.test_cls_loss_contract import EVAL_ROWS, LABELS, PAD, make_rows, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def trained(model, task, rows: list[dict], batch_size: int, compile_: bool, out):
    """4 steps of core.loop.train, eager or compiled: its result and each step's loss."""
    cfg = TrainConfig(model="tiny", batch_size=batch_size, max_steps=4, lr=1e-3, seed=0,
                      group_by_length=False, compile=compile_)
    out.mkdir()
    result = train(model, task, TrainData(rows, task.collate), cfg, task.accelerator, out)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return result, [r["loss"] for r in records if r["type"] == "train"]


def run(tmp_path, compile_: bool):
    model = tiny_model()
    task = ClassificationTask(EVAL_ROWS, PAD, 8, LABELS, Accelerator(cpu=True))
    # Every row as long as the next: one batch shape, so one compilation.
    rows = make_rows(24, seed=1, min_len=16, max_len=16)
    return *trained(model, task, rows, 8, compile_, tmp_path / f"compile-{compile_}"), model


def test_compiled_model_trains_like_the_eager_one(tmp_path):
    from torch._dynamo.utils import counters
    eager, eager_losses, eager_model = run(tmp_path, False)
    counters.clear()
    compiled, losses, model = run(tmp_path, True)
    # Block by block: each layer compiled in place, the rest of the model not.
    layers = model.distilbert.transformer.layer
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert model._compiled_call_impl is None  # embeddings and head stay eager
    # Dynamo captured them, and one graph serves both layers: one for training and one
    # for evaluation (dropout mode), not one per layer and mode.
    assert 1 <= counters["stats"]["unique_graphs"] <= 2
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    assert compiled["eval"]["loss"] == pytest.approx(eager["eval"]["loss"], rel=1e-4)
    # Compiled in place: the weights keep their names, so checkpoints and saving are unchanged.
    assert model.state_dict().keys() == eager_model.state_dict().keys()
    for name, weight in eager_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], weight, rtol=1e-3, atol=1e-5)


LAYERS = 6


def lora_run(tmp_path, compile_: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from core.demo import tiny_llama_config
    from tasks.instruct import CausalLMTask
    from tests.test_lora_training import TARGETS, VOCAB, rows
    torch.manual_seed(0)
    config = tiny_llama_config(VOCAB)
    config.num_hidden_layers = LAYERS
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.0))
    task = CausalLMTask(rows(8, seed=1), pad_id=0, eval_batch_size=8,
                        accelerator=Accelerator(cpu=True))
    return trained(model, task, rows(16), 4, compile_, tmp_path / f"lora-compile-{compile_}")


def test_compiled_lora_layers_stay_compiled_across_lengths(tmp_path, monkeypatch):
    # Batches of different lengths, a frozen first layer's input (no gradient) and
    # evaluation: a handful of graphs for all layers. A key/value cache in the forward
    # would add one per layer until dynamo's recompile limit sent the rest back to eager.
    from torch._dynamo.utils import counters
    # Graph capture and its guards are what is checked here: the aot_eager backend
    # spares inductor's code generation (half a minute on a cold cache).
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: compile_(self, **{**kw, "backend": "aot_eager"}))
    eager, eager_losses = lora_run(tmp_path, False)
    counters.clear()
    compiled, losses = lora_run(tmp_path, True)
    # Two graphs for all six layers: training's and evaluation's. (The first layer's
    # input, from frozen embeddings, would need no gradient and a graph of its own
    # without core.compiling.inputs_need_grad.)
    assert 1 <= counters["frames"]["total"] <= 2 < LAYERS
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    assert compiled["eval"]["loss"] == pytest.approx(eager["eval"]["loss"], rel=1e-4)


def test_each_model_of_a_sweep_is_compiled_afresh(monkeypatch):
    # A sweep trains a model per rank in one process. Their blocks share one function,
    # whose graphs dynamo caches together up to its recompile limit: lowered here to 1,
    # what the first rank's forward fills, the second rank's blocks would run
    # eagerly if the first's graph were kept.
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from core.compiling import compile_model
    from core.demo import tiny_llama_config
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: compile_(self, **{**kw, "backend": "aot_eager"}))
    with torch._dynamo.config.patch(recompile_limit=1):
        for r in (4, 8):
            model = get_peft_model(AutoModelForCausalLM.from_config(tiny_llama_config(97)),
                                   LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))
            compile_model(model)
            counters.clear()
            with torch.no_grad():  # a forward graph is enough to fill the limit
                model(input_ids=torch.tensor([[1, 2, 3, 4]]), use_cache=False)
            assert counters["frames"]["ok"] >= 1, f"r={r}: nothing compiled"


def test_a_decoder_classifier_builds_no_cache_but_an_encoder_is_not_asked():
    # A last-token classifier (Llama) would build a key/value cache nobody reads, and
    # under --compile one graph per layer; DistilBERT's forward takes no such argument.
    from transformers import LlamaForSequenceClassification

    from core.demo import tiny_llama_config
    from tasks.classification import forward_inputs
    config = tiny_llama_config(97)
    config.num_labels, config.pad_token_id = 2, 0
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3),
             "labels": torch.tensor([1])}
    for model, given in ((LlamaForSequenceClassification(config), {"use_cache": False}),
                         (tiny_model(), {})):
        task = ClassificationTask([], PAD, 4, LABELS, None, 1, forward_inputs(model))
        inputs = task._inputs(batch)
        assert {k: v for k, v in inputs.items() if k == "use_cache"} == given
        assert set(inputs) - {"use_cache"} == {"input_ids", "attention_mask"}


def test_answers_from_compiled_blocks_compile_nothing(monkeypatch):
    """Generation (the sweep's samples) runs blocks compiled for training eagerly: its
    key/value cache would make a graph a layer, past dynamo's limit, for a few answers."""
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from core.compiling import compile_model
    from core.demo import bpe_tokenizer, tiny_llama_config
    from eval.generate import generate_text
    from tasks.formats import InstructFormat
    from tasks.instruct import prompt_template
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: compile_(self, **{**kw, "backend": "aot_eager"}))
    tokenizer = bpe_tokenizer(["Name a colour.", "Red is a colour.", "Blue, green."] * 20)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer))),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    fmt, question = InstructFormat(prompt_template("alpaca"), tokenizer), \
        [{"role": "user", "content": "Name a colour."}]
    eager = generate_text(model.eval(), fmt, question, 6)
    compile_model(model)
    counters.clear()
    assert generate_text(model, fmt, question, 6) == eager
    assert counters["frames"]["total"] == 0
    model.train()  # and training afterwards compiles as before
    model(input_ids=torch.tensor([[1, 2, 3, 4]]), use_cache=False).logits.sum().backward()
    assert counters["frames"]["total"] > 0
