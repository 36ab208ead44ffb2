"""Rows for train_lora.py, instructions or conversations: read, their columns found,
an eval set held out, the user's added examples appended (to the training rows only)."""

from dataclasses import dataclass

from core.data import load_file, load_split, require_columns, sample, take
from core.errors import fail
from tasks.chat import pair_conversations, to_conversations
from tasks.instruct import Columns, Encoded, pair_examples, split_eval, to_examples

MESSAGES = "messages"  # the column of conversations, found without being named


@dataclass
class Rows:
    kind: str         # "instruct" (instruction/input/output) or "chat" (messages)
    train: list       # examples or conversations; the added ones last
    eval: list
    n_added: int


def messages_column(rows, cfg, where: str) -> str | None:
    """The column of conversations, or None for instruction rows.

    A column named `messages` is read as conversations unless instruction columns sit
    beside it: then the user must say which to train on.
    """
    names = rows.column_names
    if cfg.messages_column == "none":
        return None
    if cfg.messages_column:
        require_columns(rows, {"messages-column": cfg.messages_column}, where)
        return cfg.messages_column
    if MESSAGES not in names:
        return None
    beside = [c for c in (cfg.instruction_column, cfg.input_column, cfg.output_column)
              if c in names]
    if beside:
        raise fail(f"{where} has a '{MESSAGES}' column and instruction columns "
                   f"({', '.join(beside)})", f"pass --messages-column {MESSAGES} to train on "
                   "the conversations, or --messages-column none for the instruction rows")
    return MESSAGES


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


def load_examples(cfg) -> Rows:
    """The training rows (the added ones last) and the eval rows, all checked."""
    train_raw = take(load_split(cfg.dataset, cfg.train_file, cfg.train_split),
                     cfg.max_train_samples, cfg.seed)
    column = messages_column(train_raw, cfg, "the training data")

    def read(raw, where: str) -> list:
        if column is None:
            return to_examples(raw, columns_for(raw, cfg, where), where)
        require_columns(raw, {"messages-column": column}, where)
        return to_conversations(raw, column, where)

    train = read(train_raw, "the training data")
    if cfg.eval_file or cfg.eval_split:
        eval_raw = take(load_split(cfg.dataset, cfg.eval_file, cfg.eval_split),
                        cfg.max_eval_samples, cfg.seed)
        evaluation = read(eval_raw, "the eval data")
    else:
        train_idx, eval_idx = split_eval(len(train), cfg.eval_fraction, cfg.seed)
        kept = sample(len(eval_idx), cfg.max_eval_samples, cfg.seed)
        train, evaluation = [train[i] for i in train_idx], [train[eval_idx[i]] for i in kept]
    added = (pair_conversations if column else pair_examples)(cfg.add_example)
    if cfg.extra_examples:
        added += read(load_file(cfg.extra_examples), f"--extra-examples {cfg.extra_examples}")
    return Rows("chat" if column else "instruct", train + added, evaluation, len(added))


def check_added_fit(rows: Rows, cfg, fmt) -> None:
    """Each added example (--add-example, --extra-examples) fits --max-length, or the
    run is refused in one line: a data set's row whose answer cannot fit is dropped and
    counted, but an added one would be dropped while the run said it was added."""
    added = rows.train[len(rows.train) - rows.n_added:]  # the typed ones first
    typed = len(cfg.add_example)
    for i, example in enumerate(added):
        where = (f"--add-example #{i + 1}" if i < typed
                 else f"--extra-examples {cfg.extra_examples} (row {i - typed + 1})")
        fmt.encode([example], cfg.max_length, where)  # refuses one that cannot fit


def report_encoding(rows: Rows, train_enc: Encoded, eval_enc: Encoded, accelerator) -> None:
    cut = ("conversations that lost their earliest turns" if rows.kind == "chat"
           else "prompts cut")
    accelerator.print(f"{len(train_enc.rows)} training rows ({rows.n_added} added), "
                      f"{len(eval_enc.rows)} eval rows; {cut} to fit --max-length: "
                      f"{train_enc.truncated} train / {eval_enc.truncated} eval; rows dropped "
                      f"(last answer too long): {train_enc.dropped} train / "
                      f"{eval_enc.dropped} eval")
