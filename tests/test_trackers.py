"""--report-to: refusals in one line, flat hyperparameters, and the W&B route through
Accelerate's tracker with a stand-in `wandb` module (the real one is not installed here)."""

import importlib.machinery
import importlib.util
import sys
import types

import pytest
from accelerate import Accelerator

import train_cls
import train_lora
from core import trackers
from core.errors import run_cli


def refusal(main, argv, out, capsys) -> str:
    assert run_cli(main, argv + ["--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert not out.exists()  # refused before anything is written
    return err[0]


def test_an_unknown_tracker_is_refused(tmp_path, capsys):
    line = refusal(train_cls.main, ["--demo", "--report-to", "neptune"], tmp_path / "run", capsys)
    assert "invalid choice: 'neptune'" in line and "tensorboard" in line


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_tracker_not_installed_is_refused(tmp_path, capsys, name):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed here")
    line = refusal(train_lora.main, ["--demo", "--report-to", "tensorboard", name],
                   tmp_path / "run", capsys)
    assert f"needs the {name} package" in line and f"pip install 'rawtune[{name}]'" in line


def test_none_with_a_tracker_is_refused(tmp_path, capsys):
    line = refusal(train_cls.main, ["--demo", "--report-to", "none", "tensorboard"],
                   tmp_path / "run", capsys)
    assert "mixes none with trackers" in line


def test_hyperparameters_are_flat_scalars():
    flat = trackers.hyperparameters({"lr": 1e-3, "lora_r": [4, 8], "seed": 42, "demo": True,
                                     "eval_file": None, "id2label": {"0": "neg"}, "model": "m"})
    assert flat == {"lr": 1e-3, "lora_r": "[4, 8]", "seed": 42, "demo": True,
                    "eval_file": "null", "id2label": '{"0": "neg"}', "model": "m"}


@pytest.fixture
def fake_wandb(monkeypatch):
    """A `wandb` module recording what Accelerate's WandBTracker asks of it."""
    calls = []

    class Run:
        def log(self, values, step=None):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", loader=None)
    module.init = lambda **kwargs: calls.append(("init", kwargs)) or Run()
    module.config = types.SimpleNamespace(
        update=lambda values, allow_val_change: calls.append(("config", values)))
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return calls


def test_wandb_gets_the_config_every_record_and_the_end(fake_wandb, tmp_path):
    trackers.check(["wandb"])  # the stand-in counts as installed
    run = trackers.Trackers(["wandb"], Accelerator(), tmp_path / "tb", "sweep-r8",
                            {"lr": 2e-4, "lora_r": 8, "target_modules": ["q_proj", "v_proj"]})
    run.start()
    run.log("train", {"step": 1, "epoch": 0.5, "loss": 2.5, "lr": 1e-4})
    run.log("eval", {"step": 1, "epoch": 0.5, "loss": 2.0, "perplexity": 7.4})
    run.finish()
    assert fake_wandb == [
        ("init", {"project": "rawtune", "name": "sweep-r8"}),
        ("config", {"lr": 2e-4, "lora_r": 8, "target_modules": '["q_proj", "v_proj"]'}),
        ("log", {"train/epoch": 0.5, "train/loss": 2.5, "train/lr": 1e-4}, 1),
        ("log", {"eval/epoch": 0.5, "eval/loss": 2.0, "eval/perplexity": 7.4}, 1),
        ("finish",),
    ]


def test_only_rank_0_reports(fake_wandb, tmp_path, monkeypatch):
    accelerator = Accelerator()
    monkeypatch.setattr(type(accelerator), "is_main_process", property(lambda self: False))
    run = trackers.Trackers(["wandb"], accelerator, tmp_path / "tb", "run", {})
    run.start()
    run.log("train", {"step": 1, "loss": 1.0})
    run.finish()
    assert fake_wandb == []
