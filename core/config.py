"""Typed run configuration: one dataclass per script, flags generated from its fields.

Each field carries its help text, so the dataclass is the single place that says
what a setting means and what its default is. A JSON or YAML file given with
`--config` supplies values first; flags on the command line override it. The
resolved dataclass is what the run saves as `config.json`.
"""

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from core import host_memory, trackers
from core.errors import UsageError, fail

C = TypeVar("C", bound="TrainConfig")


def opt(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A config field: its default, its help line, and any argparse overrides."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default),
                                 metadata={"help": help, **argparse_kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclasses.dataclass
class TrainConfig:
    """Settings every training script shares: the loop, the optimiser, the run's files."""

    # Settings of another script, or of an older rawtune, that this one refuses by name
    # rather than as unknown: {field name: (why not here, what to do instead)}.
    refused: typing.ClassVar[dict[str, tuple[str, str]]] = {
        "return_cpu_memory": ("replaced by --cpu-memory", "use --cpu-memory return (or auto, "
                              "the default; reuse; glibc)"),
        "no_return_cpu_memory": ("replaced by --cpu-memory", "use --cpu-memory glibc")}

    config: str | None = opt(None, "JSON or YAML file of settings; flags given here override it")
    demo: bool = opt(False, "offline demo: tiny model, tokenizer trained on the fly, shipped data")
    model: str = opt("", "model name on the hub or a local directory")
    dataset: str | None = opt(None, "data set name on the hub (ignored when --train-file is given)")
    train_split: str = opt("train", "split of --dataset to train on")
    eval_split: str = opt("test", "split of --dataset to evaluate on")
    train_file: str | None = opt(None, "local training file: csv, tsv, json, jsonl or parquet")
    eval_file: str | None = opt(None, "local evaluation file, same formats")
    max_train_samples: int | None = opt(None, "keep only N training rows, drawn at random with "
                                              "--seed (the same rows for the same seed)")
    max_eval_samples: int | None = opt(None, "keep only N evaluation rows, drawn likewise")
    max_length: int = opt(512, "truncate inputs to this many tokens")
    output_dir: str = opt("runs/latest", "where the run writes its files")
    overwrite: bool = opt(False, "allow writing into a non-empty --output-dir")
    run_name: str | None = opt(None, "name shown in comparisons (default: the output dir's name)")

    epochs: float = opt(1, "passes over the training set (fractions allowed)")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (overrides --epochs)")
    batch_size: int = opt(16, "examples per micro-batch on each device")
    eval_batch_size: int = opt(16, "examples per evaluation batch on each device")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(2e-5, "peak learning rate")
    weight_decay: float = opt(0.01, "AdamW weight decay (not applied to biases and norm weights)")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    warmup_ratio: float = opt(0.0, "fraction of optimizer steps spent warming up the learning rate")
    warmup_steps: int | None = opt(None, "warmup length in steps (overrides --warmup-ratio)")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this; 0 disables clipping")
    mixed_precision: str = opt("no", "autocast precision", choices=["no", "bf16", "fp16"])
    pad_to_multiple_of: int | None = opt(None, "round each batch's length up to a multiple of N "
                                               "(default: 64 on a GPU, to bound the number of "
                                               "kernel shapes; 1 on CPU, where padding is pure cost)")
    group_by_length: bool = opt(True, "batch examples of similar length (shuffled, seeded) to cut padding")
    attn_implementation: str = opt("sdpa", "attention kernel: sdpa (PyTorch's fused attention), "
                                           "eager (plain matrix products) or flash_attention_2 "
                                           "(needs the flash-attn package and a GPU)",
                                    choices=["sdpa", "eager", "flash_attention_2"])
    compile: bool = opt(False, "torch.compile each transformer block in place: the first steps "
                               "(and evaluation) wait while it compiles; later steps launch "
                               "fewer kernels, which pays where a GPU waits on the host")
    fsdp: bool = opt(False, "shard weights, gradients and optimizer state across the launched "
                            "processes (FSDP2, one unit per transformer block) instead of a "
                            "whole copy per process: for models that outgrow one device")
    cpu_memory: str = opt("auto", "on a CPU (glibc), what malloc does with the memory a step "
                                  "frees: reuse (kept in the heap for the next step: fastest), "
                                  "return (blocks of 4 MiB or more unmapped at free: least "
                                  "resident memory, page-faulted back each step), glibc (as "
                                  "it is), auto (reuse where a trained weight is 32 MiB or "
                                  "more, as in full fine-tuning, else return)",
                          choices=list(host_memory.POLICIES))
    lane_dropout: bool = opt(True, "on a CPU without --compile, on tensors of 32k elements or "
                                   "more: dropout masks cut 16 bits an element from 64-bit "
                                   "random words (a quarter of nn.Dropout's random draws, p "
                                   "rounded to 1/65536; core/dropout.py), and sdpa's attention "
                                   "dropout a few examples at a time, in cache "
                                   "(core/attention.py)")
    peak_tflops: float | None = opt(None, "one device's peak in TFLOP/s, for MFU in the log "
                                          "(default: the dense bf16 peak of known GPUs)")
    seed: int = opt(42, "seed for data order, initialisation and dropout")

    eval_every: int = opt(0, "evaluate every N optimizer steps; 0 = at the end of each epoch")
    save_every: int = opt(0, "checkpoint every N optimizer steps; 0 = only at the end")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep")
    resume_from: str | None = opt(None, "checkpoint directory to continue from, or 'latest'")
    init_from: str | None = opt(None, "start a new run (its own plan, schedule and --output-dir) "
                                      "from the trainable weights of an earlier one: a "
                                      "checkpoint (RUN/checkpoints/step-N), or the model/ "
                                      "(train_cls.py) or adapter/ (train_lora.py) it saved; "
                                      "the optimizer and the counters start fresh")
    log_every: int | None = opt(None, "read figures back from the device every N steps; each is "
                                      "a wait for the device and the latest a stop signal can "
                                      "act (default: 1 on CPU, 10 on GPU; every step is logged)")
    skip_nonfinite: bool = opt(False, "skip optimizer steps whose loss or gradient is not finite")

    # Watching a run: trackers beside train_log.jsonl, and the best evaluation's weights.
    report_to: list[str] = opt(["none"], "also report every step and evaluation to "
                                         "tensorboard (OUT/tb/), wandb or mlflow, several "
                                         "allowed, or none; each is an extra: pip install "
                                         "'rawtune[tensorboard]'", choices=trackers.CHOICES,
                               metavar="TRACKER")
    keep_best: str | None = opt(None, "keep the weights of the best evaluation by METRIC "
                                      "(classification: accuracy, f1, precision, recall or "
                                      "loss; LoRA: loss or perplexity; loss and perplexity "
                                      "lower is better) and save them, not the last, as the "
                                      "run's model", metavar="METRIC")
    early_stopping_patience: int | None = opt(None, "with --keep-best: stop after N evaluations "
                                                    "in a row without improvement", metavar="N")

    # The numeric metrics the script's evaluation reports, for --keep-best.
    EVAL_METRICS: ClassVar[tuple[str, ...]] = ("loss",)

    def uses_demo_model(self) -> bool:
        """--demo without a --model of the user's: build the tiny model and tokenizer."""
        return self.demo and self.model == type(self).model  # the class attribute is the default

    def pad_multiple(self, device) -> int:
        """Rounding never pads past --max-length: the multiple divides it, or is 1."""
        if self.pad_to_multiple_of is not None:
            return self.pad_to_multiple_of
        return 64 if device.type == "cuda" and self.max_length % 64 == 0 else 1

    def read_back_every(self, device) -> int:
        """On a CPU the host is the device: reading back costs nothing, so every step."""
        if self.log_every is not None:
            return self.log_every
        return 10 if device.type == "cuda" else 1

    def validate(self) -> None:
        """Check ranges that argparse cannot; raise UsageError naming the flag."""
        positive = {"batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size,
                    "grad_accum": self.grad_accum, "lr": self.lr, "max_length": self.max_length,
                    "epochs": self.epochs, "keep_checkpoints": self.keep_checkpoints}
        for name, value in positive.items():
            if not value > 0:
                raise fail(f"--{flag(name)} must be positive, got {value}",
                           f"pass a value above 0 to --{flag(name)}")
        non_negative = {"weight_decay": self.weight_decay, "max_grad_norm": self.max_grad_norm,
                        "eval_every": self.eval_every, "save_every": self.save_every}
        for name, value in non_negative.items():
            if value is not None and value < 0:  # None: the script's default (train_lora.py)
                raise fail(f"--{flag(name)} must not be negative, got {value}",
                           f"pass 0 or more to --{flag(name)}")
        for name in ("max_steps", "warmup_steps", "max_train_samples", "max_eval_samples",
                     "pad_to_multiple_of", "log_every"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "warmup_steps" else 1):
                raise fail(f"--{flag(name)} is out of range: {value}", f"pass a positive --{flag(name)}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise fail(f"--peak-tflops must be positive, got {self.peak_tflops}",
                       "pass the accelerator's peak, e.g. 989 for an H100 SXM in bf16")
        if self.pad_to_multiple_of and self.max_length % self.pad_to_multiple_of:
            raise fail(f"--pad-to-multiple-of {self.pad_to_multiple_of} does not divide "
                       f"--max-length {self.max_length}",
                       "pick a divisor, so padding never exceeds --max-length")
        if not 0 <= self.warmup_ratio < 1:
            raise fail(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}",
                       "pass a fraction such as 0.1")
        if self.attn_implementation == "flash_attention_2":
            from transformers.utils import is_flash_attn_2_available
            if not is_flash_attn_2_available():
                raise fail("--attn-implementation flash_attention_2 needs the flash-attn package "
                           "and a CUDA GPU, and this machine lacks one of them",
                           "pip install flash-attn on a GPU machine, or use "
                           "--attn-implementation sdpa")
        if self.init_from and self.resume_from:
            raise fail("--init-from starts a new run and --resume-from continues one",
                       "drop --resume-from to start a new run from those weights, or "
                       "--init-from to continue the run as it was planned")
        if not self.model and not self.demo:
            raise fail("no model given", "pass --model NAME_OR_DIR, or --demo")
        trackers.check(self.report_to)
        from core import best  # here: it imports torch, which parsing flags does not need
        best.check(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flag(field_name: str) -> str:
    return field_name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors become one-line UsageErrors instead of usage dumps."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{message} — see --help")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag; the script's docstring (with its examples) kept as written."""


def _argparse_kwargs(field: dataclasses.Field, hint: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"help": field.metadata["help"]}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `T | None`
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        kwargs.update(nargs="+", type=item)
    else:
        kwargs["type"] = hint
    kwargs.update({k: v for k, v in field.metadata.items() if k != "help"})
    return kwargs


def build_parser(cls: type[C], description: str) -> argparse.ArgumentParser:
    parser = _Parser(description=description, formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        parser.add_argument(f"--{flag(field.name)}", dest=field.name,
                            default=field.default if field.default is not dataclasses.MISSING
                            else field.default_factory(),
                            **_argparse_kwargs(field, hints[field.name]))
    return parser


def read_config_file(path: str, cls: type[C]) -> dict[str, Any]:
    """Settings from a JSON or YAML file, keys spelt as fields or as flags."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise fail(f"cannot read config file {path}: {err.__class__.__name__}",
                   "check the path given to --config") from None
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml
            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as err:  # yaml and json raise different error types
        raise fail(f"config file {path} is not valid {file.suffix.lstrip('.').upper() or 'JSON'}: "
                   f"{str(err).splitlines()[0]}", "fix the file's syntax") from None
    if not isinstance(values, dict):
        raise fail(f"config file {path} does not hold a mapping of settings",
                   "write it as {\"lr\": 2e-5, ...}")
    known = {f.name for f in dataclasses.fields(cls)}
    values = {key.replace("-", "_"): value for key, value in values.items()}
    for key in values.keys() & cls.refused.keys():
        raise fail(f"config file {path} sets {key}: {cls.refused[key][0]}", cls.refused[key][1])
    unknown = sorted(set(values) - known)
    if unknown:
        raise fail(f"config file {path} has unknown settings: {', '.join(unknown)}",
                   "remove them or check the spelling against --help")
    return values


def _as_flags(values: dict[str, Any], repeated: set[str]) -> list[str]:
    """Config-file settings spelt as command-line flags, so argparse converts every type
    alike; `repeated` names the flags given once per value (--sample-prompt A
    --sample-prompt B), whose lists are spelt so."""
    argv: list[str] = []
    for name, value in values.items():
        # None and [] mean "not set here": the default stays. (A list flag takes at least
        # one value, so an empty one cannot be spelt on a command line.)
        if value is None or value == []:
            continue
        if isinstance(value, bool):
            argv.append(f"--{'' if value else 'no-'}{flag(name)}")
        elif isinstance(value, list) and value and isinstance(value[0], list):
            for item in value:  # a repeatable flag that takes several values each time
                argv += [f"--{flag(name)}", *map(str, item)]
        elif isinstance(value, list) and name in repeated:
            argv += [f"--{flag(name)}={item}" for item in value]
        elif isinstance(value, list):
            argv += [f"--{flag(name)}", *map(str, value)]
        else:  # `--lr=-1e-05`: a value starting with "-" must not be read as a flag
            argv.append(f"--{flag(name)}={value}")
    return argv


def parse_config(cls: type[C], argv: list[str] | None, description: str,
                 demo_presets: list[str] | None = None) -> C:
    """Flags over config file over `demo_presets` (when --demo is on, by flag or file)
    over dataclass defaults, validated."""
    parser = build_parser(cls, description)
    argv = list(sys.argv[1:] if argv is None else argv)
    for arg in argv:
        name = arg.split("=", 1)[0].removeprefix("--").replace("-", "_")
        if arg.startswith("--") and name in cls.refused:
            raise fail(f"{arg.split('=', 1)[0]}: {cls.refused[name][0]}", cls.refused[name][1])
    pre, _ = parser.parse_known_args(argv)
    repeated = {f.name for f in dataclasses.fields(cls)
                if f.metadata.get("action") == "append" and f.metadata.get("nargs", 1) is None}
    file_flags = _as_flags(read_config_file(pre.config, cls), repeated) if pre.config else []
    # Later flags win in argparse, so presets go first, then the file's settings.
    settings = parser.parse_args(file_flags + argv)
    if settings.demo and demo_presets:
        settings = parser.parse_args(list(demo_presets) + file_flags + argv)
    cfg = cls(**vars(settings))
    cfg.validate()
    return cfg
