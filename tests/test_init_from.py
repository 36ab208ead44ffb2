"""--init-from: a new run, under its own plan, whose trainable weights start from an
earlier run's checkpoint or saved model/adapter (issue #10, item 4).

Two short earlier runs serve every test: a classifier (train_cls.py) and a LoRA rank
(train_lora.py), each with its final checkpoint and its saved model/ or adapter/.
"""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import train_cls
import train_lora
from core.demo import tiny_distilbert_config
from core.errors import run_cli
from tasks.classification import ClassificationTask
from tasks.instruct import CausalLMTask

CLS = ["--demo", "--max-train-samples", "64", "--max-eval-samples", "16", "--batch-size", "16",
       "--eval-batch-size", "16", "--max-length", "64"]
LORA = ["--demo", "--lora-r", "4", "--max-train-samples", "48", "--batch-size", "8",
        "--eval-batch-size", "32", "--max-length", "128"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """Finished runs to start from: a classifier's (4 steps) and a LoRA rank's (2 steps)."""
    root = tmp_path_factory.mktemp("earlier")
    assert run_cli(train_cls.main, CLS + ["--max-steps", "4", "--output-dir",
                                          str(root / "cls")]) == 0
    assert run_cli(train_lora.main, LORA + ["--max-steps", "2", "--output-dir",
                                            str(root / "lora")]) == 0
    other = root / "other-model"  # a classifier of another shape: 3 labels, 100 ids
    AutoModelForSequenceClassification.from_config(
        tiny_distilbert_config(100, 3, max_length=64)).save_pretrained(other)
    return {"cls checkpoint": root / "cls" / "checkpoints" / "step-000004",
            "cls model": root / "cls" / "model", "other model": other,
            "lora checkpoint": root / "lora" / "r4" / "checkpoints" / "step-000002",
            "lora adapter": root / "lora" / "r4" / "adapter"}


@pytest.mark.parametrize("source", ["cls checkpoint", "cls model"])
def test_a_classifier_run_continues_under_a_longer_plan(earlier, source, tmp_path, first_forward):
    out = tmp_path / "longer"
    seen = first_forward(ClassificationTask)
    assert run_cli(train_cls.main, CLS + ["--max-steps", "8", "--lr", "5e-4", "--warmup-steps",
                                          "2", "--output-dir", str(out), "--init-from",
                                          str(earlier[source])]) == 0
    ended = torch.load(earlier["cls checkpoint"] / "model.pt", weights_only=True)
    assert seen.keys() == ended.keys()
    assert all(torch.equal(seen[name], ended[name]) for name in ended)
    assert json.loads((out / "config.json").read_text())["init_from"] == str(earlier[source])
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()
               if '"train"' in line]
    assert [r["step"] for r in records] == list(range(1, 9))  # counters start fresh,
    assert [r["lr"] for r in records[:3]] == pytest.approx([0, 2.5e-4, 5e-4])  # the schedule,
    optimizer = torch.load(out / "checkpoints" / "step-000008" / "optimizer.pt",
                           weights_only=True)
    assert all(float(s["step"]) == 8 for s in optimizer["state"].values())  # and AdamW


@pytest.mark.parametrize("source", ["lora checkpoint", "lora adapter"])
def test_a_lora_sweep_starts_from_an_earlier_adapter(earlier, source, tmp_path, first_forward):
    out = tmp_path / "more"
    seen = first_forward(CausalLMTask)
    assert run_cli(train_lora.main, LORA + ["--max-steps", "3", "--output-dir", str(out),
                                            "--init-from", str(earlier[source])]) == 0
    ended = torch.load(earlier["lora checkpoint"] / "model.pt", weights_only=True)
    assert seen.keys() == ended.keys() and any("lora_B" in name for name in ended)
    assert all(torch.equal(seen[name], ended[name]) for name in ended)
    assert json.loads((out / "config.json").read_text())["init_from"] == str(earlier[source])
    metrics = json.loads((out / "r4" / "metrics.json").read_text())
    assert metrics["steps"] == 3
    # Step 0 is where this run starts: the earlier run's final evaluation, not the base's.
    ended_eval = json.loads((earlier["lora adapter"].parent / "metrics.json").read_text())
    assert metrics["eval_loss_before"] == pytest.approx(ended_eval["eval_loss"], rel=1e-5)
    assert f"before training (--init-from {earlier[source]})" in (out / "sweep.md").read_text()


def test_an_interrupted_run_from_an_adapter_resumes_as_it_says(earlier, tmp_path, monkeypatch,
                                                               capsys):
    import os
    import signal
    out, real, calls = tmp_path / "more", CausalLMTask.loss_sum, {"n": 0}

    def interrupting(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, model, batch)

    monkeypatch.setattr(CausalLMTask, "loss_sum", interrupting)
    flags = LORA + ["--max-steps", "3", "--output-dir", str(out)]
    source = ["--init-from", str(earlier["lora adapter"])]
    assert run_cli(train_lora.main, flags + source) == 128 + signal.SIGTERM
    monkeypatch.setattr(CausalLMTask, "loss_sum", real)
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.endswith("the same command without --init-from and --resume-from latest "
                         f"--output-dir {out}"), said
    assert run_cli(train_lora.main, flags + ["--resume-from", "latest"]) == 0
    metrics = json.loads((out / "r4" / "metrics.json").read_text())
    ended_eval = json.loads((earlier["lora adapter"].parent / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["init_from"] == str(earlier["lora adapter"])
    assert metrics["eval_loss_before"] == pytest.approx(ended_eval["eval_loss"], rel=1e-5)


def test_the_scale_of_a_checkpoint_is_read_from_a_relative_path_too(earlier, monkeypatch):
    from tasks.lora_start import trained_scaling
    checkpoint_dir = earlier["lora checkpoint"]
    monkeypatch.chdir(checkpoint_dir.parent.parent)  # the rank's directory
    assert trained_scaling(f"checkpoints/{checkpoint_dir.name}") == (8.0, False)
    monkeypatch.chdir(checkpoint_dir.parent)
    assert trained_scaling(checkpoint_dir.name) == (8.0, False)


def test_a_dora_run_starts_from_an_earlier_dora_adapter(tmp_path, first_forward):
    # peft saves DoRA's magnitudes under the module's name, without the ".weight" the
    # model's parameter has: the adapter was refused as not fitting.
    dora = LORA + ["--use-dora", "--max-steps", "1"]
    assert run_cli(train_lora.main, dora + ["--output-dir", str(tmp_path / "first")]) == 0
    ended = torch.load(tmp_path / "first" / "r4" / "checkpoints" / "step-000001" / "model.pt",
                       weights_only=True)
    seen = first_forward(CausalLMTask)
    assert run_cli(train_lora.main, dora + ["--output-dir", str(tmp_path / "second"),
                                            "--init-from",
                                            str(tmp_path / "first" / "r4" / "adapter")]) == 0
    assert seen.keys() == ended.keys() and any("magnitude" in name for name in ended)
    assert all(torch.equal(seen[name], ended[name]) for name in ended)


def damaged(earlier, tmp_path) -> str:
    copy = tmp_path / "step-000004"
    shutil.copytree(earlier["cls checkpoint"], copy)
    (copy / "model.pt").write_bytes(b"")
    return str(copy)


BOTH = "--init-from starts a new run and --resume-from continues one"
LORA_WEIGHTS = "holds LoRA adapter weights, from a train_lora.py run"
CLS_WEIGHTS = "holds a whole model's weights, from a train_cls.py run"
# (id, script, its flags after CLS or LORA, words the one error line must hold); `e` holds
# the earlier runs' paths, `d` is a fresh directory.
CASES = [
    ("cls: with --resume-from", train_cls,
     lambda e, d: ["--init-from", str(e["cls checkpoint"]), "--resume-from", "latest"], BOTH),
    ("cls: a LoRA checkpoint", train_cls, lambda e, d: ["--init-from", str(e["lora checkpoint"])],
     LORA_WEIGHTS),
    ("cls: a LoRA adapter", train_cls, lambda e, d: ["--init-from", str(e["lora adapter"])],
     LORA_WEIGHTS),
    ("cls: another architecture", train_cls, lambda e, d: ["--init-from", str(e["other model"])],
     "does not fit this model"),
    ("cls: a damaged checkpoint", train_cls, lambda e, d: ["--init-from", damaged(e, d)],
     "fails verification: model.pt is 0 bytes"),
    ("cls: nothing there", train_cls, lambda e, d: ["--init-from", str(d / "nothing")],
     "is neither a checkpoint"),
    ("cls: resume a LoRA checkpoint", train_cls,
     lambda e, d: ["--resume-from", str(e["lora checkpoint"])], LORA_WEIGHTS),
    ("lora: with --resume-from", train_lora,
     lambda e, d: ["--init-from", str(e["lora adapter"]), "--resume-from", "latest"], BOTH),
    ("lora: a classifier's checkpoint", train_lora,
     lambda e, d: ["--init-from", str(e["cls checkpoint"])], CLS_WEIGHTS),
    ("lora: a classifier's model", train_lora, lambda e, d: ["--init-from", str(e["cls model"])],
     CLS_WEIGHTS),
    ("lora: another rank", train_lora,
     lambda e, d: ["--init-from", str(e["lora adapter"]), "--lora-r", "4", "8"],
     "holds rank-4 adapters, which cannot start a rank-8 one (--lora-r 8)"),
    ("lora: another alpha", train_lora,
     lambda e, d: ["--init-from", str(e["lora adapter"]), "--lora-alpha", "16"],
     "was trained with lora_alpha 8 (its B·A scaled by 2); this run would scale it by 4"),
    ("lora: rank-stabilised from a checkpoint", train_lora,
     lambda e, d: ["--init-from", str(e["lora checkpoint"]), "--rslora"],
     "was trained with lora_alpha 8 (its B·A scaled by 2); this run would scale it by 4"),
    ("lora: other target modules", train_lora,
     lambda e, d: ["--init-from", str(e["lora checkpoint"]), "--target-modules", "q_proj"],
     "does not fit this model"),
]


@pytest.mark.parametrize("case,script,build,words", CASES, ids=[c[0] for c in CASES])
def test_bad_init_from_is_one_line_and_writes_nothing(earlier, tmp_path, capsys, case, script,
                                                      build, words):
    out = tmp_path / "run"
    base = CLS if script is train_cls else LORA
    argv = base + build(earlier, tmp_path) + ["--output-dir", str(out)]
    assert run_cli(script.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and " — " in err[0], err
    assert words in err[0]
    assert not out.exists()
