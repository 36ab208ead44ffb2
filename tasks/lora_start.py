"""Where each rank of a LoRA sweep starts: its adapters' configuration, and the checks
that a checkpoint to resume or weights to start from (--init-from) fit its model.

The checks run on a weightless copy of each rank's model (meta tensors: names and
shapes, no memory, no weights read), before the sweep writes anything.
"""

from pathlib import Path

import torch

from core import checkpoint, init_from


def lora_config(r: int, cfg):
    """The adapters of rank r that the run's settings (a LoraRunConfig) ask for."""
    from peft import LoraConfig
    targets = "all-linear" if cfg.targets == ["all-linear"] else cfg.targets
    return LoraConfig(r=r, lora_alpha=cfg.alpha(r), lora_dropout=cfg.lora_dropout,
                      target_modules=targets, use_rslora=cfg.rslora, use_dora=cfg.use_dora,
                      task_type="CAUSAL_LM")


def check_start(cfg, config, out_dir: Path) -> None:
    """Each rank left unfinished must have a checkpoint that verifies and fits (when
    resuming), and --init-from must fit every rank; refused in one line otherwise."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    for r in cfg.lora_r:
        r_dir = out_dir / f"r{r}"
        resume = (cfg.resume_from and not (r_dir / "metrics.json").is_file()
                  and checkpoint.complete_checkpoints(r_dir / "checkpoints"))
        if not (resume or cfg.init_from):
            continue
        with torch.device("meta"):
            skeleton = get_peft_model(AutoModelForCausalLM.from_config(config),
                                      lora_config(r, cfg))
        if resume:
            checkpoint.check_fits(checkpoint.resolve("latest", r_dir).path,
                                  checkpoint.identity(skeleton))
        if cfg.init_from:
            init_from.check(cfg.init_from, skeleton)
