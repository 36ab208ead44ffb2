"""Fine-tune a sequence classifier (default: DistilBERT on IMDb) with rawtune's loop.

    python train_cls.py --demo                      # offline, tiny model, under a minute
    python train_cls.py --config configs/cls_baseline.yaml
    accelerate launch train_cls.py --mixed-precision bf16 ...

The path from data to metrics: read the rows, map labels to ids, tokenise once,
build the model, train (core/loop.py), evaluate, write the run's files.
"""

import dataclasses
import json
import sys
from pathlib import Path
from typing import ClassVar

from core import best, checkpoint, init_from, run_dir
from core.config import TrainConfig, flag, opt, parse_config
from core.data import load_split, require_columns, take
from core.demo import data_file, tiny_distilbert_config, wordpiece_tokenizer
from core.errors import fail, run_cli
from core.loop import TrainData, plan_steps, train
from core.parallel import (Agreement, check_fsdp, gathered_weights, leave,
                           make_accelerator)
from core.pretrained import check_max_length, load_pretrained
from core.trackers import Trackers
from eval.classification import plot_confusion_matrix
from eval.plot import plot_runs
from tasks.classification import (ClassificationTask, forward_inputs, label_map,
                                  one_class_warning, tokenize)
from tasks.head_row import first_row_only

PRODUCED = ["config.json", "train_log.jsonl", "metrics.json", "predictions.jsonl",
            "confusion_matrix.png", "curves.png", "model", "checkpoints", "best", "tb"]

# --demo: shipped reviews, a tiny model and tokenizer; a --config file and flags still win.
DEMO_FLAGS = ["--train-file", data_file("sentiment.jsonl"), "--max-train-samples", "1000",
              "--epochs", "4", "--lr", "1e-3", "--warmup-ratio", "0.1", "--max-length", "128",
              "--batch-size", "16", "--eval-batch-size", "64"]
DEMO_EVAL_ROWS = 200


@dataclasses.dataclass
class ClsConfig(TrainConfig):
    model: str = opt("distilbert-base-uncased", "model name on the hub or a local directory")
    dataset: str | None = opt("imdb", "data set name on the hub (ignored when --train-file is given)")
    output_dir: str | None = opt(None, "where the run writes its files (default: runs/cls-TIME)")
    text_column: str = opt("text", "column holding the text")
    text_pair_column: str | None = opt(None, "column holding a second text (sentence pairs)")
    label_column: str = opt("label", "column holding the label: int ids or class names")
    head_row_only: bool = opt(True, "BERT-style classifiers (BERT, RoBERTa, XLM-R, CamemBERT, "
                                    "ELECTRA, DistilBERT): the last layer computes only the "
                                    "first token's row, the one the head reads (the same "
                                    "logits for less work; tasks/head_row.py)")

    EVAL_METRICS: ClassVar[tuple[str, ...]] = ("accuracy", "f1", "precision", "recall", "loss")
    # train_lora.py's quantised bases: frozen weights only, and this script trains them all.
    refused = TrainConfig.refused | {
        name: ("train_cls.py trains every weight, and quantised weights cannot be trained",
               f"quantise a frozen base under LoRA adapters instead: train_lora.py --{flag(name)}")
        for name in ("load_in_4bit", "load_in_8bit")}


def load_rows(cfg: ClsConfig):
    """(train rows, eval rows) as `datasets.Dataset`s, columns checked."""
    if cfg.demo and not cfg.eval_file:
        # The demo scores on the shipped rows the training set did not take.
        rows = load_split(None, cfg.train_file, "train")
        train_rows = rows.select(range(len(rows) - DEMO_EVAL_ROWS))
        eval_rows = rows.select(range(len(rows) - DEMO_EVAL_ROWS, len(rows)))
    elif cfg.train_file and not cfg.eval_file:
        raise fail("--train-file given without --eval-file", "pass --eval-file too")
    else:
        train_rows = load_split(cfg.dataset, cfg.train_file, cfg.train_split)
        eval_rows = load_split(cfg.dataset, cfg.eval_file, cfg.eval_split)
    train_rows = take(train_rows, cfg.max_train_samples, cfg.seed)
    eval_rows = take(eval_rows, cfg.max_eval_samples, cfg.seed)
    for rows, where in ((train_rows, "the training data"), (eval_rows, "the eval data")):
        require_columns(rows, {"text-column": cfg.text_column,
                               "text-pair-column": cfg.text_pair_column,
                               "label-column": cfg.label_column}, where)
    return train_rows, eval_rows


def load_tokenizer(cfg: ClsConfig, train_rows):
    """From the hub or a directory, or trained on the training texts for --demo."""
    from transformers import AutoTokenizer
    if cfg.uses_demo_model():
        return wordpiece_tokenizer(list(train_rows[cfg.text_column]), max_length=cfg.max_length)
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, cfg.model, "tokenizer")
    if tokenizer.pad_token is None:  # GPT-style tokenizers have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise fail(f"the tokenizer of {cfg.model} has no pad, eos or unk token to pad with",
                   "use a model whose tokenizer defines one")
    return tokenizer


def model_config(cfg: ClsConfig, labels, vocab_size: int):
    """The model's config with our labels; checks --max-length before any weights are read."""
    from transformers import AutoConfig
    label_kwargs = {"num_labels": len(labels.names), "id2label": labels.id2label,
                    "label2id": labels.label2id}
    if cfg.uses_demo_model():
        config = tiny_distilbert_config(vocab_size, len(labels.names), cfg.max_length)
        config.update({k: v for k, v in label_kwargs.items() if k != "num_labels"})
        return config
    config = load_pretrained(AutoConfig.from_pretrained, cfg.model, "model", **label_kwargs)
    check_max_length(config, cfg.max_length, cfg.model)
    return config


def load_model(cfg: ClsConfig, config):
    """The classifier: pretrained weights with a new head, or built tiny for --demo.

    Every weight is trained, so every weight is fp32, and so is AdamW's state, whatever
    dtype the checkpoint was saved in (transformers would otherwise keep it: a bf16
    checkpoint would train bf16 weights). --mixed-precision alone decides the autocast.
    """
    import torch
    from transformers import AutoModelForSequenceClassification
    if cfg.uses_demo_model():
        return AutoModelForSequenceClassification.from_config(
            config, attn_implementation=cfg.attn_implementation)
    return load_pretrained(AutoModelForSequenceClassification.from_pretrained, cfg.model,
                           "model", config=config, dtype=torch.float32,
                           attn_implementation=cfg.attn_implementation)


def check_start(cfg: ClsConfig, config, out_dir: Path) -> None:
    """The checkpoint to resume or the weights to start from must fit the model: checked on
    a weightless copy of it (meta tensors) before anything is written."""
    if not (cfg.resume_from or cfg.init_from):
        return
    import torch
    from transformers import AutoModelForSequenceClassification
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(config)
    if cfg.resume_from:
        checkpoint.check_fits(checkpoint.resolve(cfg.resume_from, out_dir).path,
                              checkpoint.identity(skeleton))
    if cfg.init_from:
        init_from.check(cfg.init_from, skeleton)


def main(argv: list[str] | None = None) -> int:
    from accelerate.utils import set_seed

    cfg = parse_config(ClsConfig, argv, __doc__, DEMO_FLAGS)
    accelerator = make_accelerator(cfg.mixed_precision)
    out_dir = run_dir.choose(cfg.output_dir, "cls-demo" if cfg.demo else "cls", accelerator)
    set_seed(cfg.seed)

    # Everything that can fail on bad input happens before the first file is written,
    # and on every rank alike (see core.parallel.Agreement).
    with Agreement(accelerator) as agreed:
        check_fsdp(accelerator, cfg)
        run_dir.check_writable(out_dir, cfg.overwrite, bool(cfg.resume_from))
        if cfg.resume_from:  # a checkpoint that is not there is bad input: say so now
            checkpoint.resolve(cfg.resume_from, out_dir)
        train_raw, eval_raw = load_rows(cfg)
        labels = label_map(train_raw, cfg.label_column)
        tokenizer = load_tokenizer(cfg, train_raw)
        config = model_config(cfg, labels, len(tokenizer))
        config.pad_token_id = tokenizer.pad_token_id  # last-token pooling models find it by this
        check_start(cfg, config, out_dir)
        columns = (cfg.text_column, cfg.text_pair_column, cfg.label_column)
        train_rows = tokenize(train_raw, tokenizer, *columns, labels, cfg.max_length,
                              "the training data")
        eval_rows = tokenize(eval_raw, tokenizer, *columns, labels, cfg.max_length,
                             "the eval data")
        # Can a batch be filled? Does early stopping have evaluations to compare?
        best.check_plan(cfg, *plan_steps(len(train_rows), cfg, accelerator.num_processes))
        agreed.what = {**cfg.to_dict(), "training data": checkpoint.data_fingerprint(train_rows),
                       "eval data": checkpoint.data_fingerprint(eval_rows)}
    model = load_model(cfg, config)  # last: the weights are the slow part
    # What config.json records is what runs: off for a model whose head reads more rows.
    cfg.head_row_only = cfg.head_row_only and first_row_only(model)

    if accelerator.is_main_process:
        run_dir.create(out_dir, PRODUCED, cfg.overwrite, bool(cfg.resume_from))
    if accelerator.is_main_process and not (cfg.resume_from and (out_dir / "config.json").exists()):
        run_dir.write_json(out_dir / "config.json", {
            **cfg.to_dict(), "output_dir": str(out_dir), "run_name": cfg.run_name or out_dir.name,
            "id2label": labels.id2label, "world_size": accelerator.num_processes,
            "n_train": len(train_rows), "n_eval": len(eval_rows)})
    accelerator.wait_for_everyone()

    if warning := one_class_warning(eval_rows, labels, "the eval data"):
        accelerator.print(warning)
    task = ClassificationTask(eval_rows, tokenizer.pad_token_id, cfg.eval_batch_size,
                              len(labels.names), accelerator,
                              cfg.pad_multiple(accelerator.device), forward_inputs(model))
    data = TrainData(train_rows, task.collate, [len(r["input_ids"]) for r in train_rows])
    trackers = Trackers(cfg.report_to, accelerator, out_dir / "tb", cfg.run_name or out_dir.name,
                        cfg.to_dict())
    result = train(model, task, data, cfg, accelerator, out_dir, trackers)

    # Under --fsdp every rank hands in its shards; rank 0 writes the whole model.
    weights = gathered_weights(model, trainable_only=False) if cfg.fsdp else None
    if accelerator.is_main_process:
        write_outputs(out_dir, result, task, labels, accelerator.unwrap_model(model), tokenizer,
                      weights)
    # Tear down the process group: one left alive at interpreter exit can abort the process.
    accelerator.end_training()
    return 0


def write_outputs(out_dir: Path, result: dict, task: ClassificationTask, labels, model,
                  tokenizer, weights: dict | None) -> None:
    metrics = {**result["eval"], "train_s": result["train_s"],
               "train_samples_per_s": result["train_samples_per_s"],
               "train_loss": result["train_loss"], "steps": result["steps"],
               "skipped_steps": result["skipped_steps"],
               "state_mib_per_device": result["state_mib_per_device"], **result["keep_best"]}
    run_dir.write_json(out_dir / "metrics.json", metrics)
    with (out_dir / "predictions.jsonl").open("w") as f:
        for row in task.predictions:
            f.write(json.dumps(row) + "\n")
    plot_confusion_matrix(metrics["confusion_matrix"], labels.names,
                          out_dir / "confusion_matrix.png",
                          title=f"{out_dir.name}: accuracy {metrics['accuracy']:.2%}")
    model.save_pretrained(out_dir / "model", state_dict=weights)  # None: the model's own
    tokenizer.save_pretrained(out_dir / "model")
    plot_runs([out_dir], out_dir / "curves.png")
    print(f"accuracy {metrics['accuracy']:.4f}  precision {metrics['precision']:.4f}  "
          f"recall {metrics['recall']:.4f}  f1 {metrics['f1']:.4f}  "
          f"({metrics['n_eval']} eval examples, {metrics['train_s']:.1f}s training)\n"
          f"files in {out_dir}")


def cli() -> int:
    """The `rawtune-cls` console script."""
    return leave(run_cli(main))


if __name__ == "__main__":
    sys.exit(cli())
