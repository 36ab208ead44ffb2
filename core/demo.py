"""Tiny models and on-the-fly tokenizers for the offline demos and the tests.

They show the whole pipeline in seconds on a laptop CPU; they say nothing about the
accuracy a real pretrained model reaches.
"""

from collections import Counter
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
    """A lower-casing WordPiece tokenizer in BERT's format, its vocabulary taken from `texts`.

    The vocabulary is built by counting rather than by the `tokenizers` trainer, whose
    ties are broken differently from run to run: the same texts must give the same
    token ids, or a resumed demo would train on other ids than the run it continues.
    It holds every character seen (alone and as a `##` continuation), then the most
    frequent words; rarer words are spelt out from characters.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in
                      pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars]
    frequent = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    vocab += frequent[:max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)},
                                     unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
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
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
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


def sentencepiece_tokenizer_dir(texts: Iterable[str], directory: str | Path,
                                vocab_size: int = 600) -> Path:
    """A sentencepiece BPE model saved as `tokenizer.model`, in Llama's (and OpenLLaMA's) layout.

    Ids 0-2 are <unk>, <s>, </s> and there is no pad token, as in the original
    LLaMA files; unknown characters fall back to bytes. Loads with
    transformers' SentencePieceBackend.from_pretrained(directory).
    """
    import io
    import json

    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model,
                                   vocab_size=vocab_size, model_type="bpe", unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, byte_fallback=True, minloglevel=2)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "add_bos_token": True}))
    return directory
