"""Where each rank of a LoRA sweep starts: its adapters' configuration, and the checks
that a checkpoint to resume or weights to start from (--init-from) fit its model.

The checks run on a weightless copy of each rank's model (meta tensors: names and
shapes, no memory, no weights read), before the sweep writes anything.
"""

import json
import math
import re
from pathlib import Path

import torch

from core import checkpoint, init_from
from core.errors import fail


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
            check_scale(cfg, r)


def scale(alpha: float, r: int, rslora: bool) -> float:
    """What LoRA multiplies B·A by: alpha/r, or alpha/sqrt(r) for rank-stabilised LoRA."""
    return alpha / (math.sqrt(r) if rslora else r)


def trained_scaling(spec: str) -> tuple[float, bool] | None:
    """(lora_alpha, use_rslora) the adapters at `spec` were trained with: from an
    adapter's adapter_config.json or, for a checkpoint RUN/rR/checkpoints/step-N, from
    the run's RUN/config.json; None where neither is there."""
    path = Path(spec).resolve()  # a relative checkpoint path names no run above it
    if (path / "adapter_config.json").is_file():
        saved = json.loads((path / "adapter_config.json").read_text())
        return float(saved["lora_alpha"]), bool(saved.get("use_rslora", False))
    rank = re.fullmatch(r"r(\d+)", path.parent.parent.name)
    run_config = path.parents[2] / "config.json" if len(path.parents) > 2 else None
    if not (rank and run_config and run_config.is_file()):
        return None
    saved = json.loads(run_config.read_text())
    alpha = saved.get("lora_alpha")
    return (float(alpha) if alpha is not None else 2.0 * int(rank[1]),
            bool(saved.get("rslora", False)))


def check_scale(cfg, r: int) -> None:
    """--init-from's adapters start this run only under the scale they were trained at:
    the same A and B under another alpha (or --rslora) are another model."""
    trained = trained_scaling(cfg.init_from)
    if trained is None:
        return
    alpha, rslora = trained
    theirs, mine = scale(alpha, r, rslora), scale(cfg.alpha(r), r, cfg.rslora)
    if not math.isclose(theirs, mine):
        raise fail(f"--init-from {cfg.init_from} was trained with lora_alpha {alpha:g}"
                   f"{' and --rslora' if rslora else ''} (its B·A scaled by {theirs:g}); "
                   f"this run would scale it by {mine:g}, so it would not start where that "
                   f"run ended",
                   f"pass --lora-alpha {alpha:g} {'--rslora' if rslora else '--no-rslora'}")
