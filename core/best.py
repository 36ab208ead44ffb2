"""--keep-best METRIC and --early-stopping-patience N: the best evaluation's weights.

After each evaluation the loop hands the metrics to a `BestKeeper`. An improvement on
the best so far (loss and perplexity: lower is better; accuracy, F1, precision,
recall: higher) writes the trainable weights to `best/step-N/model.pt`, under a
temporary name then renamed, like a checkpoint. When training ends, those weights go
back into the model and are scored again: they are what the script saves (`model/`,
or a rank's `adapter/`), and metrics.json reports them, with the last evaluation's
figures beside them under `last_eval`.

The record (best value and step, evaluations since the last improvement) lives in the
loop's state, so every checkpoint carries it and a resumed run goes on from the best
so far. A checkpoint can name an older best than the newest on disk (an improvement
after it was written), so the weights of every best a kept checkpoint names stay
until that checkpoint goes.

Early stopping ends the run after N evaluations in a row without improvement: a
clean end (exit 0) with a final checkpoint, recorded in the log and in metrics.json.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from core import checkpoint
from core.errors import fail

LOWER_IS_BETTER = {"loss", "perplexity"}
WEIGHTS = "model.pt"


def check(cfg) -> None:
    """--keep-best names a metric the task reports; --early-stopping-patience needs one."""
    metrics = type(cfg).EVAL_METRICS
    if cfg.keep_best is not None and cfg.keep_best not in metrics:
        raise fail(f"--keep-best {cfg.keep_best}: this task's evaluation reports no such metric",
                   f"pick one of: {', '.join(metrics)}")
    patience = cfg.early_stopping_patience
    if patience is not None and patience < 1:
        raise fail(f"--early-stopping-patience must be positive, got {patience}",
                   "pass how many evaluations without improvement to allow, e.g. 2")
    if patience is not None and cfg.keep_best is None:
        raise fail("--early-stopping-patience needs --keep-best METRIC to know what improving "
                   "means", f"add --keep-best with one of: {', '.join(metrics)}")
    if cfg.keep_best is not None and cfg.fsdp:
        raise fail("--keep-best is not supported with --fsdp (each improvement would gather "
                   "the sharded weights from every process)", "drop one of the two")


def evaluations(cfg, micro_per_epoch: int, total_steps: int) -> int:
    """How many times the loop evaluates: every --eval-every steps (or at each epoch's
    end, when 0) and at the last step."""
    every = cfg.eval_every or math.ceil(micro_per_epoch / cfg.grad_accum)
    return total_steps // every + (total_steps % every != 0)


def check_plan(cfg, micro_per_epoch: int, total_steps: int) -> None:
    """Early stopping compares evaluations: a run that makes one has none to compare."""
    if cfg.early_stopping_patience is None:
        return
    if evaluations(cfg, micro_per_epoch, total_steps) < 2:
        raise fail(f"--early-stopping-patience {cfg.early_stopping_patience}: this run of "
                   f"{total_steps} steps evaluates once, at its end, so there is nothing to "
                   f"compare", "evaluate more often with --eval-every N, or train more epochs")


class BestKeeper:
    """The best evaluation so far and its weights; inert without --keep-best."""

    def __init__(self, cfg, out_dir: Path, state: dict[str, Any], accelerator):
        self.metric, self.patience = cfg.keep_best, cfg.early_stopping_patience
        self.root, self.ckpt_root = out_dir / "best", out_dir / "checkpoints"
        self.accelerator = accelerator
        fresh = {"metric": self.metric, "step": None, "value": None, "since": 0,
                 "stopped_at": None}
        # Kept in the loop's state: every checkpoint carries it, a resume restores it.
        self.record = state.setdefault("best", fresh) if self.metric else fresh
        if self.record["step"] is not None and not self._weights(self.record["step"]).is_file():
            raise fail(f"the best weights so far (step {self.record['step']}) are missing from "
                       f"{self.root}", "resume from a checkpoint whose best weights are kept, "
                       "or start the run afresh")

    @property
    def stopped(self) -> bool:
        return self.record["stopped_at"] is not None

    def _weights(self, step: int) -> Path:
        return self.root / f"{checkpoint.PREFIX}{step:06d}" / WEIGHTS

    def update(self, metrics: dict[str, Any], step: int, model, log) -> bool:
        """Record an evaluation; keep the weights if it is the best. True: stop early."""
        if not self.metric:
            return False
        value, record = float(metrics[self.metric]), self.record
        best = record["value"]
        if best is None or (value < best if self.metric in LOWER_IS_BETTER else value > best):
            self._save(model, step)
            record.update(step=step, value=value, since=0)
            return False
        record["since"] += 1
        if self.patience is None or record["since"] < self.patience:
            return False
        record["stopped_at"] = step
        log.print(f"early stopping at step {step}: {self.metric} has not improved for "
                  f"{record['since']} evaluations (best {best:.4f} at step {record['step']})")
        return True

    def _save(self, model, step: int) -> None:
        accelerator = self.accelerator
        if accelerator.is_main_process:
            final = self._weights(step).parent
            tmp = final.with_name(f".tmp-{final.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save(checkpoint.trainable_state(accelerator.unwrap_model(model)), tmp / WEIGHTS)
            shutil.rmtree(final, ignore_errors=True)  # the same step again, after a resume
            tmp.rename(final)
            self._prune(keep=step)
        accelerator.wait_for_everyone()  # every rank may read them back at the end

    def _prune(self, keep: int) -> None:
        """Remove the best weights that neither `keep` nor a kept checkpoint names."""
        named = {keep}
        for ckpt in checkpoint.complete_checkpoints(self.ckpt_root):
            state = json.loads((ckpt / "trainer_state.json").read_text())
            named.add(state.get("best", {}).get("step"))
        for path in self.root.glob(f"{checkpoint.PREFIX}*"):
            if checkpoint.step_of(path) not in named:
                shutil.rmtree(path)

    def restore(self, model, task, last_eval: dict[str, Any], step: int, log) -> dict[str, Any]:
        """Put the best weights back into `model` and score them; the metrics of what the
        run saves. Without --keep-best, or when the last evaluation was the best: as is."""
        best_step = self.record["step"]
        if not self.metric or best_step == step:
            return last_eval
        weights = torch.load(self._weights(best_step), weights_only=True)
        loaded = self.accelerator.unwrap_model(model).load_state_dict(weights, strict=False)
        assert not loaded.unexpected_keys, loaded.unexpected_keys  # same model, same names
        model.eval()
        kept = task.evaluate(self.accelerator.unwrap_model(model))
        log.print(f"kept the weights of step {best_step}: {self.metric} "
                  f"{kept[self.metric]:.4f} (the last evaluation, at step {step}: "
                  f"{last_eval[self.metric]:.4f})")
        return kept

    def report(self, last_eval: dict[str, Any], step: int) -> dict[str, Any]:
        """What metrics.json adds with --keep-best: the best, the last evaluation, the stop."""
        if not self.metric:
            return {}
        record = self.record
        fields = {"best": {"metric": self.metric, "step": record["step"], "value": record["value"]},
                  "last_eval": {"step": step, **{k: v for k, v in last_eval.items()
                                                 if isinstance(v, (int, float))}}}
        if self.patience is not None:
            fields["early_stopping"] = {"patience": self.patience,
                                        "stopped_at_step": record["stopped_at"]}
        return fields
