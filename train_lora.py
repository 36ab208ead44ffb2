"""LoRA instruction tuning of a causal LM (default: OpenLLaMA 3B v2 on Alpaca), swept over ranks.

    python train_lora.py --demo                              # offline, tiny model, seconds
    python train_lora.py --lora-r 4 8 16 32 --train-file alpaca.jsonl
    python train_lora.py --train-file qa.jsonl --add-example "Who wrote it?" "Ann" --merge
    accelerate launch train_lora.py --mixed-precision bf16 --gradient-checkpointing ...

The path from data to results: read the rows, render prompts and tokenise once
(tasks/instruct.py); then, for each --lora-r, rebuild the base model with the same
seed, wrap it in LoRA adapters, train (core/loop.py), evaluate (eval/lm.py) and save
the adapter. Every rank sees the same data order and the same held-out rows, so the
runs differ in r alone. Finally, a plot and a table compare the ranks.

Files: OUT/config.json; OUT/r{R}/ with adapter/, train_log.jsonl, metrics.json (and
merged/ with --merge); OUT/loss_vs_r.png, OUT/sweep.md, OUT/sweep.json. With --demo,
OUT/base_model/ holds the tiny base the adapters load onto.
"""

import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from core import checkpoint, run_dir
from core.config import TrainConfig, opt, parse_config
from core.data import load_file, load_split, sample, take
from core.demo import bpe_tokenizer, data_file, tiny_llama_config
from core.errors import fail, run_cli
from core.loop import TrainData, plan_steps, train
from core.parallel import Agreement, check_fsdp, gathered_weights, make_accelerator
from core.pretrained import check_max_length, load_pretrained
from eval.lm import plot_loss_vs_r
from tasks.instruct import (ALPACA_WITH_INPUT, CausalLMTask, Columns, Encoded, encode,
                            pair_examples, prompt_template, split_eval, to_examples)

DEFAULT_MODEL = "openlm-research/open_llama_3b_v2"
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SWEEP_FILES = ["config.json", "base_model", "loss_vs_r.png", "sweep.md", "sweep.json"]

# --demo: the shipped instruction set, a tiny Llama and a BPE tokenizer trained on
# the rows; the full sweep. A --config file and flags still win. The tiny base is
# untrained, and its frozen output layer alone would cap how sharp its predictions
# can get, so the demo adapts lm_head as well as the projections.
DEMO_FLAGS = ["--train-file", data_file("qa.jsonl"), "--lora-r", "4", "8", "16", "32",
              "--target-modules", *LLAMA_PROJECTIONS, "lm_head", "--eval-fraction", "0.1",
              "--epochs", "2", "--lr", "5e-3", "--warmup-ratio", "0.05", "--batch-size", "16",
              "--eval-batch-size", "64", "--max-length", "256", "--lora-dropout", "0.0"]


@dataclasses.dataclass
class LoraRunConfig(TrainConfig):
    model: str = opt(DEFAULT_MODEL, "base model on the hub or a local directory")
    dataset: str | None = opt("tatsu-lab/alpaca",
                              "data set on the hub (ignored when --train-file is given)")
    eval_split: str | None = opt(None, "split of --dataset to evaluate on "
                                       "(default: hold out --eval-fraction of the training rows)")
    output_dir: str | None = opt(None, "where the run writes its files (default: runs/lora-TIME)")
    max_length: int = opt(512, "longest row in tokens: a longer prompt loses its middle; a row "
                               "whose response alone does not fit is dropped")
    lr: float = opt(2e-4, "peak learning rate (LoRA's few weights take a higher one than full "
                          "fine-tuning)")
    batch_size: int = opt(8, "examples per micro-batch on each device")
    eval_batch_size: int = opt(8, "examples per evaluation batch on each device")
    weight_decay: float = opt(0.0, "AdamW weight decay on the LoRA matrices")
    warmup_ratio: float = opt(0.03, "fraction of optimizer steps spent warming up the learning rate")

    instruction_column: str = opt("instruction", "column of instructions (optional: without it "
                                                 "the input is the instruction)")
    input_column: str = opt("input", "column of inputs (optional: without it inputs are empty)")
    output_column: str = opt("output", "column of the answers to learn")
    prompt_template: str = opt("alpaca", "'alpaca' (Alpaca's instruction/input/response template, "
                                         "and its variant without the input section for rows with "
                                         "an empty input), a template with {instruction} and "
                                         "{input} (\\n = newline), or a file holding one")
    prompt_template_no_input: str | None = opt(None, "template with {instruction} only, for rows "
                                                     "with an empty input (default: the main "
                                                     "template with an empty {input})")
    eval_fraction: float = opt(0.05, "without --eval-file or --eval-split, hold out this seeded "
                                     "fraction of the training rows (the same rows for every r)")
    add_example: list[list[str]] = opt([], "append a question/answer pair to the training rows "
                                           "(repeatable; never added to the eval rows)",
                                       action="append", nargs=2, type=str,
                                       metavar=("QUESTION", "ANSWER"))
    extra_examples: str | None = opt(None, "file of extra training rows, same columns as the data")

    slow_tokenizer: bool | None = opt(None, "load the sentencepiece tokenizer from tokenizer.model "
                                            "instead of the fast one (default: on for models named "
                                            "open_llama, whose fast conversion tokenises wrongly)")
    lora_r: list[int] = opt([8], "LoRA rank(s); several run a sweep, one training per rank")
    lora_alpha: float | None = opt(None, "LoRA alpha, the same for every r (default: 2r, so "
                                         "alpha/r stays 2 across a sweep)")
    rslora: bool = opt(False, "rank-stabilised LoRA: scale updates by alpha/sqrt(r), not alpha/r")
    lora_dropout: float = opt(0.05, "dropout on the LoRA branch's input")
    target_modules: list[str] = opt(LLAMA_PROJECTIONS, "layers to adapt, by name (space- or "
                                                       "comma-separated), or all-linear")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass: "
                                              "less memory, about a third more time")
    merge: bool = opt(False, "also save each base model with its adapter merged in, to r{R}/merged")

    @property
    def targets(self) -> list[str]:
        return [name for item in self.target_modules for name in item.split(",") if name]

    def alpha(self, r: int) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * r

    def validate(self) -> None:
        super().validate()
        bad = [r for r in self.lora_r if r <= 0]
        if bad:
            raise fail(f"--lora-r must be positive, got {bad[0]}", "pass ranks such as 4 8 16")
        if len(set(self.lora_r)) != len(self.lora_r):
            raise fail(f"--lora-r lists a rank twice: {' '.join(map(str, self.lora_r))}",
                       "give each rank once")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise fail(f"--lora-alpha must be positive, got {self.lora_alpha}",
                       "pass a value above 0, or leave it out for 2r")
        if not 0 <= self.lora_dropout < 1:
            raise fail(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}",
                       "pass a fraction such as 0.05")
        if not 0 < self.eval_fraction < 1:
            raise fail(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}",
                       "pass a fraction such as 0.05")
        if self.train_file and self.eval_split and not self.eval_file:
            raise fail("--eval-split names a split of --dataset, but the rows come from "
                       "--train-file", "pass --eval-file, or drop --eval-split to hold out "
                       "--eval-fraction of the training rows")
        if not self.targets or ("all-linear" in self.targets and len(self.targets) > 1):
            raise fail(f"--target-modules {' '.join(self.target_modules)} is not a list of layer "
                       f"names", "name layers such as q_proj v_proj, or pass all-linear alone")
        if self.resume_from not in (None, "latest"):
            raise fail(f"--resume-from {self.resume_from}: a sweep resumes each rank from its "
                       f"own directory", "pass --resume-from latest with the sweep's --output-dir")
        pair_examples(self.add_example)  # an empty question or answer is refused here


def columns_for(rows, cfg: LoraRunConfig, where: str) -> Columns:
    """The columns `rows` use. A default-named instruction or input column may be absent."""
    names = rows.column_names
    defaults = LoraRunConfig()
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


def load_examples(cfg: LoraRunConfig):
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


def use_slow_tokenizer(cfg: LoraRunConfig) -> bool:
    if cfg.slow_tokenizer is not None:
        return cfg.slow_tokenizer
    return "open_llama" in cfg.model.lower()


def load_tokenizer(cfg: LoraRunConfig, train_examples: list[dict]):
    """The model's tokenizer (sentencepiece or fast), or a BPE one trained for --demo."""
    if cfg.uses_demo_model():
        texts = [ALPACA_WITH_INPUT] + [text for e in train_examples for text in e.values() if text]
        return bpe_tokenizer(texts, max_length=cfg.max_length)
    if use_slow_tokenizer(cfg):
        # transformers 5 builds every AutoTokenizer on the fast backend; this class reads
        # tokenizer.model with the sentencepiece library, as the model was trained with.
        from transformers import SentencePieceBackend
        tokenizer = load_pretrained(SentencePieceBackend.from_pretrained, cfg.model,
                                    "sentencepiece tokenizer (tokenizer.model)")
    else:
        from transformers import AutoTokenizer
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, cfg.model, "tokenizer")
    if tokenizer.pad_token is None:
        # Any id will do: attention masks hide padding and its labels are -100.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def model_config(cfg: LoraRunConfig, tokenizer):
    if cfg.uses_demo_model():
        config = tiny_llama_config(len(tokenizer), cfg.max_length)
        config.update({"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                       "eos_token_id": tokenizer.eos_token_id})
        return config
    from transformers import AutoConfig
    config = load_pretrained(AutoConfig.from_pretrained, cfg.model, "model config")
    check_max_length(config, cfg.max_length, cfg.model)
    return config


def check_target_modules(config, targets: list[str], model_name: str) -> None:
    """Every named target must match a layer LoRA can adapt; checked on a weightless copy."""
    if targets == ["all-linear"]:
        return
    from transformers import AutoModelForCausalLM
    try:
        with torch.device("meta"):  # shapes only: no memory, no download of weights
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise fail(f"{model_name} is not a causal language model ({str(err).splitlines()[0][:120]})",
                   "pass a decoder model such as a Llama") from None
    adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
    layers = [name for name, module in skeleton.named_modules()
              if isinstance(module, adaptable) or type(module).__name__ == "Conv1D"]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in layers)]
    if missing:
        choices = sorted({name.rsplit(".", 1)[-1] for name in layers})
        raise fail(f"--target-modules {' '.join(missing)} match(es) no layer of {model_name}",
                   f"choose from {', '.join(choices)}, or pass all-linear")


def base_dtype(accelerator, mixed_precision: str) -> torch.dtype:
    """bf16 base weights for bf16 runs on a device that computes in bf16; LoRA weights stay fp32."""
    if (mixed_precision == "bf16" and accelerator.device.type == "cuda"
            and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def build_lora_model(source: str, r: int, cfg: LoraRunConfig, dtype: torch.dtype):
    """A fresh base model from `source` with fresh LoRA adapters of rank r; base frozen."""
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    set_seed(cfg.seed)  # every rank starts from the same adapter initialisation draws
    base = load_pretrained(AutoModelForCausalLM.from_pretrained, source, "model", dtype=dtype,
                           attn_implementation=cfg.attn_implementation)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing back-propagates into the LoRA weights even
        # though no input of a checkpointed block (the frozen embeddings) needs a gradient.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    targets = "all-linear" if cfg.targets == ["all-linear"] else cfg.targets
    lora = LoraConfig(r=r, lora_alpha=cfg.alpha(r), lora_dropout=cfg.lora_dropout,
                      target_modules=targets, use_rslora=cfg.rslora, task_type="CAUSAL_LM")
    # peft keeps adapter weights in fp32 over a bf16 base (autocast_adapter_dtype).
    return get_peft_model(base, lora)


def finished_metrics(r_dir: Path, cfg: LoraRunConfig) -> dict | None:
    """A resumed sweep keeps the ranks that had finished."""
    path = r_dir / "metrics.json"
    return json.loads(path.read_text()) if cfg.resume_from and path.is_file() else None


def run_rank(r: int, source: str, cfg: LoraRunConfig, task: CausalLMTask, data: TrainData,
             tokenizer, accelerator, r_dir: Path, baseline: dict | None) -> dict:
    """Train one rank into r_dir and save its adapter; return its metrics.

    `baseline` is the untrained model's evaluation; None makes this rank compute it.
    """
    dtype = base_dtype(accelerator, cfg.mixed_precision)
    model = build_lora_model(source, r, cfg, dtype).to(accelerator.device)
    trainable, total = model.get_nb_trainable_parameters()
    if baseline is None:
        # LoRA's B matrices start at zero, so the untrained model is the base model:
        # one evaluation serves as every rank's step 0.
        model.eval()
        baseline = task.evaluate(model)
    resume = "latest" if cfg.resume_from and checkpoint.complete_checkpoints(
        r_dir / "checkpoints") else None
    result = train(model, task, data, dataclasses.replace(cfg, resume_from=resume), accelerator,
                   r_dir)
    metrics = {"r": r, "lora_alpha": cfg.alpha(r), "eval_loss": result["eval"]["loss"],
               "perplexity": result["eval"]["perplexity"], "eval_loss_before": baseline["loss"],
               "train_loss": result["train_loss"], "final_train_loss": final_train_loss(r_dir),
               "trainable_params": trainable, "total_params": total,
               "train_tokens_per_s": result["train_tokens_per_s"],
               "train_target_tokens_per_s": result["train_units_per_s"],
               "train_samples_per_s": result["train_samples_per_s"], "train_s": result["train_s"],
               "steps": result["steps"], "skipped_steps": result["skipped_steps"],
               "n_eval_tokens": result["eval"]["n_eval_tokens"],
               "state_mib_per_device": result["state_mib_per_device"]}
    # Under --fsdp every rank hands in its shards of the adapter; rank 0 writes it whole.
    weights = gathered_weights(model, trainable_only=True) if cfg.fsdp else None
    if accelerator.is_main_process:
        save_rank(accelerator.unwrap_model(model), tokenizer, metrics, r_dir, weights)
        if cfg.merge:
            save_merged(model if weights is None else None, source, dtype, tokenizer, r_dir)
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # the shared accelerator drops its references to this model
    return metrics


def final_train_loss(r_dir: Path) -> float:
    """Mean loss of the last tenth of the steps: the end of the curve, less noisy than one step."""
    losses = [record["loss"] for record in read_log(r_dir) if record["type"] == "train"]
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def read_log(r_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (r_dir / "train_log.jsonl").read_text().splitlines()]


def save_rank(model, tokenizer, metrics: dict, r_dir: Path, weights: dict | None) -> None:
    """The adapter (from `weights` when the model is sharded), tokenizer and metrics."""
    # The base's embeddings are never resized here, so the adapter need not carry them
    # (peft would copy lm_head whole into the adapter when lm_head is a target).
    model.save_pretrained(r_dir / "adapter", save_embedding_layers=False, state_dict=weights)
    tokenizer.save_pretrained(r_dir / "adapter")
    run_dir.write_json(r_dir / "metrics.json", metrics)


def save_merged(model, source: str, dtype: torch.dtype, tokenizer, r_dir: Path) -> None:
    """The base with the adapter folded in, to r_dir/merged. A sharded model (None here)
    cannot merge in place: the base is loaded whole on this rank and the saved adapter
    put onto it, as a user would."""
    if model is None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        model = PeftModel.from_pretrained(base, r_dir / "adapter")
    merged = model.merge_and_unload()  # last: merging folds the adapter into the base for good
    merged.save_pretrained(r_dir / "merged")
    tokenizer.save_pretrained(r_dir / "merged")


def count_with_unit(n: int) -> str:
    """A parameter count in three figures and a unit (2442240 -> "2.44 M"): short enough
    for the sweep table to fit a terminal; sweep.json keeps the exact count."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            value = n / size
            return f"{value:.{2 if value < 10 else 1 if value < 100 else 0}f} {unit}"
    return str(n)


def write_sweep(out_dir: Path, results: list[dict]) -> None:
    """loss_vs_r.png, sweep.json and sweep.md; the table is also printed."""
    from rich.console import Console
    from rich.table import Table

    curves = {m["r"]: [(rec["step"], rec["loss"]) for rec in read_log(out_dir / f"r{m['r']}")
                       if rec["type"] == "train"] for m in results}
    plot_loss_vs_r(curves, {m["r"]: m["eval_loss"] for m in results},
                   results[0]["eval_loss_before"], out_dir / "loss_vs_r.png")
    run_dir.write_json(out_dir / "sweep.json", results)
    # Short headers, so the printed table fits an 80-column terminal.
    header = ["r", "alpha", "params", "% params", "train loss", "eval loss", "ppl", "train s",
              "tok/s"]
    rows = [[str(m["r"]), f"{m['lora_alpha']:g}", count_with_unit(m["trainable_params"]),
             f"{100 * m['trainable_params'] / m['total_params']:.2f}",
             f"{m['final_train_loss']:.4f}", f"{m['eval_loss']:.4f}", f"{m['perplexity']:.2f}",
             f"{m['train_s']:.1f}", f"{m['train_tokens_per_s']:.0f}"] for m in results]
    before = results[0]["eval_loss_before"]
    note = f"Eval loss before training (the base model): {before:.4f} (perplexity " \
           f"{math.exp(min(before, 700)):.2f})."
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    (out_dir / "sweep.md").write_text("\n".join(["# LoRA rank sweep", "", *lines, "", note]) + "\n")
    table = Table(title="LoRA rank sweep", caption=note)
    for name in header:  # in a terminal too narrow for the table, figures wrap, never cut
        table.add_column(name, justify="right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def main(argv: list[str] | None = None) -> int:

    cfg = parse_config(LoraRunConfig, argv, __doc__, DEMO_FLAGS)
    accelerator = make_accelerator(cfg.mixed_precision)
    out_dir = run_dir.choose(cfg.output_dir, "lora-demo" if cfg.demo else "lora", accelerator)
    resuming = bool(cfg.resume_from)

    # Everything that can fail on bad input happens before the first file is written,
    # and on every rank alike (see core.parallel.Agreement).
    with Agreement(accelerator) as agreed:
        check_fsdp(accelerator, cfg)
        run_dir.check_writable(out_dir, cfg.overwrite, resuming)
        if resuming and not any((d / "metrics.json").is_file()
                                or checkpoint.complete_checkpoints(d / "checkpoints")
                                for d in out_dir.glob("r*")):
            raise fail(f"nothing to resume in {out_dir}: no rank has a checkpoint or "
                       f"metrics.json", "drop --resume-from, or point --output-dir at the "
                       "interrupted sweep")
        train_examples, eval_examples, n_added = load_examples(cfg)
        template = prompt_template(cfg.prompt_template, cfg.prompt_template_no_input)
        tokenizer = load_tokenizer(cfg, train_examples)
        config = model_config(cfg, tokenizer)
        check_target_modules(config, cfg.targets, cfg.model)
        train_enc = encode(train_examples, template, tokenizer, cfg.max_length,
                           "the training data")
        eval_enc = encode(eval_examples, template, tokenizer, cfg.max_length, "the eval data")
        plan_steps(len(train_enc.rows), cfg, accelerator.num_processes)  # a batch filled?
        agreed.what = {**cfg.to_dict(),
                       "training data": checkpoint.data_fingerprint(train_enc.rows),
                       "eval data": checkpoint.data_fingerprint(eval_enc.rows)}
    report_encoding(train_enc, eval_enc, n_added, accelerator)

    rank_dirs = {r: out_dir / f"r{r}" for r in cfg.lora_r}
    if accelerator.is_main_process:
        earlier = [p.name for p in out_dir.glob("r*") if p.name[1:].isdigit()]
        run_dir.create(out_dir, SWEEP_FILES + earlier, cfg.overwrite, resuming)
        for path in rank_dirs.values():
            path.mkdir(exist_ok=True)
    # A resumed sweep keeps the config.json of the run it continues.
    if accelerator.is_main_process and not (resuming and (out_dir / "config.json").exists()):
        run_dir.write_json(out_dir / "config.json", {
            **cfg.to_dict(), "output_dir": str(out_dir), "run_name": cfg.run_name or out_dir.name,
            "world_size": accelerator.num_processes, "slow_tokenizer": use_slow_tokenizer(cfg)
            and not cfg.uses_demo_model(), "prompt_template_text": template.with_input,
            "prompt_template_no_input_text": template.no_input,
            "n_train": len(train_enc.rows), "n_eval": len(eval_enc.rows), "n_added": n_added,
            "n_truncated": {"train": train_enc.truncated, "eval": eval_enc.truncated},
            "n_dropped": {"train": train_enc.dropped, "eval": eval_enc.dropped}})
    source = cfg.model
    if cfg.uses_demo_model():
        source = str(out_dir / "base_model")
        if accelerator.is_main_process and not (out_dir / "base_model").is_dir():
            save_demo_base(config, cfg.seed, Path(source))
    accelerator.wait_for_everyone()

    # One task and one batching for every rank: nothing in them depends on r.
    task = CausalLMTask(eval_enc.rows, tokenizer.pad_token_id, cfg.eval_batch_size, accelerator,
                        cfg.pad_multiple(accelerator.device))
    data = TrainData(train_enc.rows, task.collate, [len(r["input_ids"]) for r in train_enc.rows])
    results, baseline = [], None
    # The fp16 loss scale adapts to a run: each rank starts from the initial one.
    fresh_scaler = accelerator.scaler.state_dict() if accelerator.scaler else None
    for r, r_dir in rank_dirs.items():
        metrics = finished_metrics(r_dir, cfg)
        if metrics is None:
            accelerator.print(f"— LoRA r={r}, alpha={cfg.alpha(r):g} —")
            if fresh_scaler:
                accelerator.scaler.load_state_dict(fresh_scaler)
            metrics = run_rank(r, source, cfg, task, data, tokenizer, accelerator, r_dir,
                               baseline)
        baseline = baseline or {"loss": metrics["eval_loss_before"]}
        results.append(metrics)

    if accelerator.is_main_process:
        write_sweep(out_dir, results)
        print(f"files in {out_dir}")
    # Tear down the process group: one left alive at interpreter exit can abort the process.
    accelerator.end_training()
    return 0


def report_encoding(train_enc: Encoded, eval_enc: Encoded, n_added: int, accelerator) -> None:
    accelerator.print(f"{len(train_enc.rows)} training rows ({n_added} added), "
                      f"{len(eval_enc.rows)} eval rows; prompts cut to fit --max-length: "
                      f"{train_enc.truncated} train / {eval_enc.truncated} eval; rows dropped "
                      f"(response too long): {train_enc.dropped} train / {eval_enc.dropped} eval")


def save_demo_base(config, seed: int, path: Path) -> None:
    """The demo's tiny base, initialised from the seed and saved so adapters can load onto it."""
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM
    set_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


if __name__ == "__main__":
    sys.exit(run_cli(main))
