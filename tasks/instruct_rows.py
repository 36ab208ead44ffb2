"""Instruction rows for train_lora.py: read, their columns found, an eval set held
out, the user's added examples appended (to the training rows only)."""

from core.data import load_file, load_split, sample, take
from core.errors import fail
from tasks.instruct import Columns, Encoded, pair_examples, split_eval, to_examples


def columns_for(rows, cfg, where: str) -> Columns:
    """The columns `rows` use. A default-named instruction or input column may be absent."""
    names = rows.column_names
    defaults = type(cfg)()  # the script's config class: its defaults
    present = {}
    for flag, name, default in (("instruction-column", cfg.instruction_column,
                                 defaults.instruction_column),
                                ("input-column", cfg.input_column, defaults.input_column),
                                ("output-column", cfg.output_column, None)):
        if name in names:
            present[flag] = name
        elif name != default:  # named on purpose (or the output): it must be there
            raise fail(f"column '{name}' not found in {where} (columns: {', '.join(names)})",
                       f"name the right one with --{flag}")
    columns = Columns(present.get("instruction-column"), present.get("input-column"),
                      cfg.output_column)
    if columns.instruction is None and columns.input is None:
        raise fail(f"{where} has neither an '{cfg.instruction_column}' nor an '{cfg.input_column}' "
                   f"column (columns: {', '.join(names)})",
                   "name the prompt's column with --instruction-column or --input-column")
    return columns


def load_examples(cfg):
    """(train examples, eval examples, number of added examples), all checked."""
    train_raw = take(load_split(cfg.dataset, cfg.train_file, cfg.train_split),
                     cfg.max_train_samples, cfg.seed)
    train = to_examples(train_raw, columns_for(train_raw, cfg, "the training data"),
                        "the training data")
    if cfg.eval_file or cfg.eval_split:
        eval_raw = take(load_split(cfg.dataset, cfg.eval_file, cfg.eval_split),
                        cfg.max_eval_samples, cfg.seed)
        evaluation = to_examples(eval_raw, columns_for(eval_raw, cfg, "the eval data"),
                                 "the eval data")
    else:
        train_idx, eval_idx = split_eval(len(train), cfg.eval_fraction, cfg.seed)
        kept = sample(len(eval_idx), cfg.max_eval_samples, cfg.seed)
        train, evaluation = [train[i] for i in train_idx], [train[eval_idx[i]] for i in kept]
    added = pair_examples(cfg.add_example)
    if cfg.extra_examples:
        extra = load_file(cfg.extra_examples)
        where = f"--extra-examples {cfg.extra_examples}"
        added += to_examples(extra, columns_for(extra, cfg, where), where)
    return train + added, evaluation, len(added)


def report_encoding(train_enc: Encoded, eval_enc: Encoded, n_added: int, accelerator) -> None:
    accelerator.print(f"{len(train_enc.rows)} training rows ({n_added} added), "
                      f"{len(eval_enc.rows)} eval rows; prompts cut to fit --max-length: "
                      f"{train_enc.truncated} train / {eval_enc.truncated} eval; rows dropped "
                      f"(response too long): {train_enc.dropped} train / {eval_enc.dropped} eval")
