"""Every setting of train_lora.py, typed, with its help text and its checks.

The flags of `python train_lora.py --help` are generated from these fields
(core/config.py); `config.json` of a run is this dataclass, resolved.
"""

import dataclasses
import math
from pathlib import Path
from typing import ClassVar

from core.config import TrainConfig, opt
from core.errors import fail
from tasks.instruct import pair_examples
from tasks.lora_model import LLAMA_PROJECTIONS
from tasks.quantize import check_settings

DEFAULT_MODEL = "openlm-research/open_llama_3b_v2"


@dataclasses.dataclass
class LoraRunConfig(TrainConfig):
    model: str = opt(DEFAULT_MODEL, "base model on the hub or a local directory")
    dataset: str | None = opt("tatsu-lab/alpaca",
                              "data set on the hub (ignored when --train-file is given)")
    eval_split: str | None = opt(None, "split of --dataset to evaluate on "
                                       "(default: hold out --eval-fraction of the training rows)")
    output_dir: str | None = opt(None, "where the run writes its files (default: runs/lora-TIME)")
    max_length: int = opt(512, "longest row in tokens: a longer prompt loses its middle (a "
                               "conversation its earliest turns); a row whose response (last "
                               "exchange) alone does not fit is dropped")
    lr: float = opt(2e-4, "peak learning rate (LoRA's few weights take a higher one than full "
                          "fine-tuning)")
    batch_size: int = opt(8, "examples per micro-batch on each device")
    eval_batch_size: int = opt(8, "examples per evaluation batch on each device")
    weight_decay: float = opt(0.0, "AdamW weight decay on the LoRA matrices")
    warmup_ratio: float = opt(0.03, "fraction of optimizer steps spent warming up the learning rate")
    eval_every: int | None = opt(None, "evaluate every N optimizer steps; 0 = at the end of each "
                                       "epoch (default: a tenth of each rank's steps, rounded "
                                       "up: about 10 evaluations, the sweep plot's eval curves)")

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

    # Conversations, what is trained, samples (issue 12); DoRA.
    messages_column: str | None = opt(None, "column of conversations, lists of {role, content} "
                                            "messages (default: 'messages' when the data has "
                                            "it); 'none' reads instruction rows instead")
    chat_template: str | None = opt(None, "for conversations: 'chatml' (shipped with rawtune) or "
                                          "a Jinja file (default: the tokenizer's own; ChatML "
                                          "with --demo)")
    preview: bool = opt(False, "print the first training row with its trained tokens marked "
                               "(every run writes the first few to preview.txt)")
    sample_prompt: list[str] = opt([], "a prompt answered by the base model and after each r, "
                                       "into samples.md (repeatable; --add-example questions "
                                       "are added)", action="append", nargs=None)
    sample_prompts: str | None = opt(None, "file of prompts, one per line, answered likewise")
    sample_max_new_tokens: int = opt(64, "most tokens in a sample answer")
    sample_temperature: float = opt(0.0, "0: greedy sample answers; above 0: sampled at this "
                                         "temperature, seeded with --seed")
    use_dora: bool = opt(False, "DoRA (weight-decomposed LoRA, through peft): each adapted "
                                "weight's magnitude is trained apart from its direction, which "
                                "LoRA updates; slower steps")

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
    load_in_4bit: bool = opt(False, "QLoRA: hold the frozen base in 4-bit NF4 with double "
                                    "quantisation (bitsandbytes), computing in the run's "
                                    "precision: about 1/8 of its fp32 memory; needs "
                                    "pip install -e '.[qlora]'")
    load_in_8bit: bool = opt(False, "hold the frozen base in 8-bit (bitsandbytes LLM.int8): "
                                    "about 1/4 of its fp32 memory; needs pip install -e '.[qlora]'")
    merge: bool = opt(False, "also save each base model with its adapter merged in, to r{R}/merged")

    EVAL_METRICS: ClassVar[tuple[str, ...]] = ("loss", "perplexity")

    @property
    def targets(self) -> list[str]:
        return [name for item in self.target_modules for name in item.split(",") if name]

    def alpha(self, r: int) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * r

    def with_eval_every(self, total_steps: int) -> "LoraRunConfig":
        """--eval-every resolved: unset, a tenth of a rank's steps, rounded up (at most
        10 evaluations, and every step of a run shorter than 10)."""
        if self.eval_every is not None:
            return self
        return dataclasses.replace(self, eval_every=math.ceil(total_steps / 10))

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
        check_settings(self)  # --load-in-4bit/8bit: one of them, without --fsdp, installed
        if any(not prompt.strip() for prompt in self.sample_prompt):
            raise fail("a --sample-prompt is empty", "give each prompt some text")
        if self.sample_prompts and not Path(self.sample_prompts).is_file():
            raise fail(f"--sample-prompts file not found: {self.sample_prompts}",
                       "check the path (one prompt per line)")
        if self.sample_max_new_tokens < 1 or self.sample_temperature < 0:
            raise fail("--sample-max-new-tokens must be positive and --sample-temperature not "
                       "negative", "pass e.g. --sample-max-new-tokens 64 --sample-temperature 0")
