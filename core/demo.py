"""Tiny models and on-the-fly tokenizers for the offline demos and the tests.

They show the whole pipeline in seconds on a laptop CPU; they say nothing about the
accuracy a real pretrained model reaches.
"""

from importlib import resources
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (DistilBertConfig, LlamaConfig, PreTrainedTokenizerFast)

DATA = resources.files("core") / "demo_data"


def data_file(name: str) -> str:
    """Path of a data file shipped with the package (sentiment.jsonl, qa.jsonl, ...)."""
    return str(Path(str(DATA / name)))


def wordpiece_tokenizer(texts: Iterable[str], vocab_size: int = 2000,
                        max_length: int = 256) -> PreTrainedTokenizerFast:
    """A lower-casing WordPiece tokenizer in BERT's format, trained on `texts`."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size,
                                                             special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=max_length)


def bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1000,
                  max_length: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer in Llama's layout: <s> begins a text, </s> ends a response."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=max_length)


def tiny_distilbert_config(vocab_size: int, num_labels: int = 2, max_length: int = 256,
                           dropout: float = 0.1) -> DistilBertConfig:
    return DistilBertConfig(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, hidden_dim=256,
                            max_position_embeddings=max_length, num_labels=num_labels,
                            dropout=dropout, attention_dropout=dropout, seq_classif_dropout=dropout)


def tiny_llama_config(vocab_size: int, max_length: int = 512) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=172,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=max_length, tie_word_embeddings=False)
