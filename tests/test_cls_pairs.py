"""Text pairs: the segment ids a BERT-family tokenizer returns reach the model in training
and evaluation, so rawtune's eval equals the saved model served on `tokenizer(a, b)`."""

import json

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertTokenizer, pipeline)

import train_cls
from conftest import shared_path
from core.data import load_split
from core.demo import data_file, wordpiece_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def pair_files(tmp_path, n_train: int, n_eval: int) -> tuple[str, str]:
    """Pairs of shipped reviews, labelled by whether the two share a sentiment."""
    rows = list(load_split(None, data_file("sentiment.jsonl"), "train"))
    pairs = [{"first": a["text"], "second": b["text"],
              "label": "same" if a["label"] == b["label"] else "differ"}
             for a, b in zip(rows[::2], rows[1::2])]
    files = []
    for name, part in (("train", pairs[:n_train]), ("eval", pairs[n_train:n_train + n_eval])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in part))
        files.append(str(path))
    return files[0], files[1]


def train_on_pairs(model: str, tmp_path, *flags: str):
    train_file, eval_file = pair_files(tmp_path, 48, 24)
    out = tmp_path / "run"
    assert train_cls.main(["--model", model, "--train-file", train_file, "--eval-file", eval_file,
                           "--text-column", "first", "--text-pair-column", "second",
                           "--batch-size", "16", "--eval-batch-size", "8", "--max-steps", "2",
                           "--output-dir", str(out), *flags]) == 0
    evaluated = [json.loads(line) for line in (out / "predictions.jsonl").open()]
    return out, [json.loads(line) for line in open(eval_file)], evaluated


def assert_served_like_evaluated(out, eval_rows, evaluated):
    """The saved model on `tokenizer(a, b)`, and in a pipeline, gives rawtune's eval."""
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    firsts, seconds = [r["first"] for r in eval_rows], [r["second"] for r in eval_rows]
    inputs = tokenizer(firsts, seconds, truncation=True, max_length=128, padding=True,
                       return_tensors="pt")
    assert inputs["token_type_ids"].any()  # the second texts are segment 1
    with torch.no_grad():
        probs = model(**inputs).logits.softmax(-1)
    expected = torch.tensor([e["probabilities"] for e in evaluated])
    torch.testing.assert_close(probs, expected, rtol=0, atol=2e-6)  # predictions are rounded
    classify = pipeline("text-classification", model=str(out / "model"), tokenizer=tokenizer)
    served = classify([{"text": a, "text_pair": b} for a, b in zip(firsts, seconds)],
                      truncation=True, max_length=128)
    id2label = model.config.id2label
    assert [s["label"] for s in served] == [id2label[e["prediction"]] for e in evaluated]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny BERT (it has segment embeddings) with a WordPiece tokenizer in BERT's format."""
    path = tmp_path_factory.mktemp("tiny") / "bert"
    texts = load_split(None, data_file("sentiment.jsonl"), "train")["text"]
    tokenizer = BertTokenizer(vocab=wordpiece_tokenizer(texts).get_vocab(), model_max_length=128)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=128,
                        type_vocab_size=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_pair_segment_ids_reach_the_model(tiny_bert, tmp_path):
    """Issue #16, item 2: only input_ids were kept, so BERT-family models trained and were
    scored on pairs with all-zero token_type_ids, while the saved model served on
    `tokenizer(a, b)` or in a pipeline got ones on the second text."""
    assert_served_like_evaluated(*train_on_pairs(tiny_bert, tmp_path, "--max-length", "128"))


@pytest.mark.real
@pytest.mark.slow
def test_minilm_pairs_are_served_as_evaluated(tmp_path):
    """Item 2 on a real BERT-family encoder and its own tokenizer."""
    model = shared_path("models", "all-MiniLM-L6-v2")
    assert_served_like_evaluated(*train_on_pairs(str(model), tmp_path, "--max-length", "128"))
