"""A watched classification run: TensorBoard read back with its own reader, curves.png,
the best evaluation's weights saved as model/, early stopping, and a resume that
restores the best so far.

On these 96 demo rows the eval loss is lowest after epoch 1 (step 6) and higher after
epoch 2 (step 12), so --keep-best loss with a patience of 1 keeps step 6 and stops at 12.
"""

import glob
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import train_cls
from conftest import MEASURED
from core.config import parse_config
from core.errors import run_cli
from tasks.classification import ClassificationTask

FLAGS = ["--demo", "--max-train-samples", "96", "--max-eval-samples", "40", "--epochs", "3",
         "--keep-best", "loss", "--early-stopping-patience", "1", "--report-to", "tensorboard",
         "--save-every", "3"]

pytestmark = pytest.mark.usefixtures("one_thread")


def records(out, kind=None):
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in rows
            if kind is None or r["type"] == kind]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("watch") / "run"
    assert run_cli(train_cls.main, FLAGS + ["--output-dir", str(out)]) == 0
    return out


def scalars(tb_dir, tag):
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_holds_every_record_and_the_settings(run):
    train, evals = records(run, "train"), records(run, "eval")
    assert scalars(run / "tb", "train/loss") == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train]  # float32 in events
    assert scalars(run / "tb", "eval/accuracy") == [
        (r["step"], pytest.approx(r["accuracy"], rel=1e-6)) for r in evals]
    assert {"train/lr", "train/grad_norm", "eval/f1"} <= set(
        EventAccumulator(str(run / "tb")).Reload().Tags()["scalars"])
    (hparams_file,) = glob.glob(str(run / "tb" / "*" / "events.out.tfevents.*"))
    starts = [plugin_data_pb2.HParamsPluginData.FromString(
                  value.metadata.plugin_data.content).session_start_info
              for event in EventFileLoader(hparams_file).Load() for value in event.summary.value
              if value.tag == "_hparams_/session_start_info"]
    settings = starts[0].hparams
    config = json.loads((run / "config.json").read_text())
    assert settings["lr"].number_value == pytest.approx(config["lr"])
    assert settings["keep_best"].string_value == "loss"
    assert json.loads(settings["report_to"].string_value) == ["tensorboard"]


def test_early_stopping_ends_the_run_cleanly(run):
    evals = records(run, "eval")
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[1]["loss"] > evals[0]["loss"]
    assert records(run, "train")[-1]["step"] == 12  # of 18
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 12
    assert metrics["early_stopping"] == {"patience": 1, "stopped_at_step": 12}


def test_the_saved_model_is_the_best_evaluations(run):
    best, last = records(run, "eval")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best"] == {"metric": "loss", "step": 6, "value": best["loss"]}
    assert metrics["loss"] == pytest.approx(best["loss"], abs=1e-12)  # scored again
    assert metrics["accuracy"] == best["accuracy"]
    assert metrics["last_eval"]["step"] == 12
    assert metrics["last_eval"]["loss"] == last["loss"]
    kept = torch.load(run / "best" / "step-000006" / "model.pt", weights_only=True)
    saved = load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(saved[name], kept[name]) for name in saved)


def test_the_saved_model_reproduces_the_best_metrics(run):
    """Loaded as a user would, model/ scores the eval rows as the best evaluation did."""
    cfg = parse_config(train_cls.ClsConfig, FLAGS, "", train_cls.DEMO_FLAGS)
    _, eval_rows = train_cls.load_rows(cfg)
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    model = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    with torch.no_grad():
        batch = tokenizer(list(eval_rows["text"]), padding=True, truncation=True, max_length=128,
                          return_tensors="pt")
        logits = model(**batch).logits
    labels = torch.tensor(list(eval_rows["label"]))
    best = records(run, "eval")[0]
    assert (logits.argmax(-1) == labels).float().mean().item() == pytest.approx(best["accuracy"])
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert loss == pytest.approx(best["loss"], rel=1e-4)  # padding differs from the run's batches


def test_curves_are_drawn(run):
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_restores_the_best_so_far(run, tmp_path, monkeypatch):
    """Stopped by SIGTERM at step 8 and resumed from the checkpoint of step 6 (past the best,
    before its early stop), the run ends as the uninterrupted one did."""
    out, calls = tmp_path / "run", {"n": 0}
    real = ClassificationTask.loss_sum

    def loss_sum(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 8:  # one micro-batch a step: the 8th step's forward
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, model, batch)

    monkeypatch.setattr(ClassificationTask, "loss_sum", loss_sum)
    assert run_cli(train_cls.main, FLAGS + ["--output-dir", str(out)]) == 128 + signal.SIGTERM
    monkeypatch.setattr(ClassificationTask, "loss_sum", real)
    # Back to step 6: steps 7 and 8 are logged, in the JSONL and in TensorBoard, twice over.
    shutil.rmtree(out / "checkpoints" / "step-000008")
    assert run_cli(train_cls.main, FLAGS + ["--output-dir", str(out),
                                            "--resume-from", "latest"]) == 0

    assert records(out) == records(run)
    assert json.loads((out / "metrics.json").read_text())["best"] == json.loads(
        (run / "metrics.json").read_text())["best"]
    got, want = load_file(out / "model" / "model.safetensors"), load_file(
        run / "model" / "model.safetensors")
    assert all(torch.equal(got[name], want[name]) for name in want)
    steps = [step for step, _ in scalars(out / "tb", "train/loss")]
    assert steps == list(range(1, 13))  # the purged steps 7 and 8 show once
    assert np.allclose([v for _, v in scalars(out / "tb", "train/loss")],
                       [v for _, v in scalars(run / "tb", "train/loss")])
