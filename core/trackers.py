"""Experiment trackers (--report-to): TensorBoard, Weights & Biases, MLflow.

`train_log.jsonl` stays the run's source of truth; a tracker gets a copy of every
record the log writes (the step's figures as `train/...`, an evaluation's as
`eval/...`, at the optimizer step) and the resolved settings as hyperparameters.
Only rank 0 reports.

The trackers are Accelerate's own (`accelerate.tracking`), started and finished here
rather than through `Accelerator.init_trackers`/`end_training`, for two reasons: the
output directory is chosen after the Accelerator exists (its timestamp is agreed
over the process group the Accelerator joins), and a sweep opens one tracker run per
rank r while `end_training` would also tear down that process group. TensorBoard
writes to `OUT/tb/` (`OUT/tb/r{R}/` per rank of a sweep); a resumed run purges the
events the interrupted one logged after its checkpoint, so every step shows once.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from core.errors import fail

# --report-to name -> the package it needs (and rawtune's extra that installs it).
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
CHOICES = [*PACKAGES, "none"]
PROJECT = "rawtune"  # W&B project and MLflow experiment, unless the environment names one


def check(names: list[str]) -> None:
    """Refuse `none` mixed with trackers, and a tracker whose package is not installed."""
    if "none" in names and len(names) > 1:
        raise fail(f"--report-to {' '.join(names)} mixes none with trackers",
                   "pass none alone, or the trackers alone")
    for name in names:
        if name != "none" and importlib.util.find_spec(PACKAGES[name]) is None:
            raise fail(f"--report-to {name} needs the {PACKAGES[name]} package, which is not "
                       f"installed", f"pip install 'rawtune[{name}]', or drop {name} from "
                       f"--report-to")


def hyperparameters(config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """Settings as the flat scalars every tracker takes: lists, mappings and None as JSON."""
    return {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for key, value in config.items()}


class Trackers:
    """One tracker run per training: `start` (by core.runlog.RunLog), `log`, `finish`.

    `tb_dir` is where TensorBoard writes; `run_name` names the W&B and MLflow run.
    On ranks other than 0, and with --report-to none, it holds no tracker at all.
    """

    def __init__(self, names: list[str], accelerator, tb_dir: Path, run_name: str,
                 config: dict[str, Any]):
        main = accelerator.is_main_process
        self.names = [name for name in names if name != "none"] if main else []
        self.tb_dir, self.run_name, self.config = tb_dir, run_name, config
        self.live: list = []

    def _make(self, name: str, resume_step: int):
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker
        if name == "tensorboard":
            # Events from purge_step on (logged after the checkpoint a run resumes from)
            # are hidden, so a resumed run's steps replace them instead of doubling the curve.
            return TensorBoardTracker(self.tb_dir.name, self.tb_dir.parent,
                                      purge_step=resume_step + 1 if resume_step else None)
        if name == "wandb":
            return WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=self.run_name)
        return MLflowTracker(experiment_name=PROJECT, run_name=self.run_name)

    def start(self, resume_step: int = 0) -> None:
        for name in self.names:
            tracker = self._make(name, resume_step)
            tracker.start()
            tracker.store_init_configuration(hyperparameters(self.config))
            self.live.append(tracker)

    def log(self, prefix: str, record: dict[str, Any]) -> None:
        """A log record's numbers as `prefix/name` at the record's step."""
        values = {f"{prefix}/{key}": float(value) for key, value in record.items()
                  if isinstance(value, (int, float)) and key != "step"}
        for tracker in self.live:
            tracker.log(values, step=int(record["step"]))

    def finish(self) -> None:
        for tracker in self.live:
            tracker.finish()
        self.live = []
