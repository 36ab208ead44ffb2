"""--keep-best and --early-stopping-patience: refusals, the evaluation count, the sweep's
default --eval-every, and a LoRA rank that keeps its best adapter.

(A classification run kept, stopped early and resumed: tests/test_watch_run.py.)
"""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train_cls
import train_lora
from core import best
from core.errors import run_cli
from tasks.lora_config import LoraRunConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("main, argv, expected", [
    (train_cls.main, ["--keep-best", "bleu"],
     "--keep-best bleu: this task's evaluation reports no such metric — pick one of: "
     "accuracy, f1, precision, recall, loss"),
    (train_lora.main, ["--keep-best", "accuracy"], "pick one of: loss, perplexity"),
    (train_cls.main, ["--early-stopping-patience", "2"],
     "--early-stopping-patience needs --keep-best METRIC"),
    (train_cls.main, ["--keep-best", "loss", "--early-stopping-patience", "0"],
     "--early-stopping-patience must be positive"),
    (train_cls.main, ["--keep-best", "f1", "--fsdp"], "--keep-best is not supported with --fsdp"),
    # One epoch evaluated at its end only: nothing to compare.
    (train_cls.main, ["--keep-best", "loss", "--early-stopping-patience", "1", "--epochs", "1",
                      "--max-train-samples", "64"], "evaluates once, at its end"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, main, argv, expected):
    out = tmp_path / "run"
    assert run_cli(main, ["--demo", *argv, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("eval_every, total, expected", [
    (0, 18, 3),   # at the end of each of 3 epochs of 6 steps
    (0, 8, 2),    # one epoch's end, then the last step
    (5, 18, 4),   # steps 5, 10, 15 and the last
    (6, 18, 3),
])
def test_evaluations_are_counted_as_the_loop_makes_them(eval_every, total, expected):
    cfg = SimpleNamespace(eval_every=eval_every, grad_accum=2)
    assert best.evaluations(cfg, micro_per_epoch=11, total_steps=total) == expected


@pytest.mark.parametrize("eval_every, total, expected", [
    (None, 95, 10), (None, 101, 11), (None, 4, 1), (0, 95, 0), (7, 95, 7)])
def test_the_sweep_evaluates_about_ten_times_unless_told(eval_every, total, expected):
    cfg = LoraRunConfig(eval_every=eval_every).with_eval_every(total)
    assert cfg.eval_every == expected
    if eval_every is None:  # the last step is evaluated too, and still no more than 10
        assert best.evaluations(cfg, micro_per_epoch=total, total_steps=total) <= 10


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """r = 32 on 160 demo rows for 2 epochs: the eval loss falls, then turns up."""
    out = tmp_path_factory.mktemp("lora-best") / "run"
    argv = ["--demo", "--lora-r", "32", "--max-train-samples", "160", "--epochs", "2",
            "--keep-best", "loss", "--report-to", "tensorboard", "--output-dir", str(out)]
    assert run_cli(train_lora.main, argv) == 0
    return out


def test_a_rank_keeps_its_best_adapter(lora_run):
    r_dir = lora_run / "r32"
    evals = [json.loads(line) for line in (r_dir / "train_log.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "eval"]
    assert len(evals) == 9  # 18 steps, --eval-every resolved to 2
    best_eval = min(evals, key=lambda r: r["loss"])
    assert best_eval["step"] < evals[-1]["step"]  # over-fitting: the last is not the best
    metrics = json.loads((r_dir / "metrics.json").read_text())
    assert metrics["best"] == {"metric": "loss", "step": best_eval["step"],
                               "value": best_eval["loss"]}
    assert metrics["eval_loss"] == pytest.approx(best_eval["loss"], abs=1e-12)
    assert metrics["last_eval"]["loss"] == evals[-1]["loss"]
    kept = torch.load(r_dir / "best" / f"step-{best_eval['step']:06d}" / "model.pt",
                      weights_only=True)
    kept = {name.replace(".default", ""): w for name, w in kept.items()}  # as peft saves them
    adapter = load_file(r_dir / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == kept.keys()
    assert all(torch.equal(adapter[name], kept[name]) for name in adapter)


def test_a_sweeps_tensorboard_runs_are_per_rank(lora_run):
    events = EventAccumulator(str(lora_run / "tb" / "r32")).Reload()
    steps = [e.step for e in events.Scalars("eval/loss")]
    assert steps == list(range(2, 19, 2))
