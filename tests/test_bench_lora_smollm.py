"""The benchmark's real LoRA workload, lora-smollm: its rows, its model from the cache, and a
peer at its best (Trainer batching by length too), as results.md says. No training here."""

import argparse
import json

import pytest

from bench import run
from bench.shared_models import RecipeMissing


@pytest.fixture
def alpaca(tmp_path):
    rows = [{"instruction": f"Say {i}.", "input": "", "output": "" if i % 50 == 0 else str(i)}
            for i in range(3000)]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepared(alpaca, tmp_path, steps=0) -> dict:
    args = argparse.Namespace(alpaca_file=str(alpaca), steps=steps, peak_tflops=989.0)
    return run.prepare("lora-smollm", run.WORKLOADS["lora-smollm"], args, tmp_path / "work",
                       on_gpu=False)


def test_rows_slice_and_model_from_the_cache(alpaca, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(run, "built_model", lambda name, shared: built.append(name) or
                        tmp_path / "cache" / name)
    job = prepared(alpaca, tmp_path)
    assert built == ["smollm2-135m-instruct"]
    assert job["model_dir"] == str(tmp_path / "cache" / "smollm2-135m-instruct")
    assert (job["n_train"], job["n_eval"]) == (400, 100)
    train = [json.loads(line) for line in open(job["train_file"])]
    dev = [json.loads(line) for line in open(job["eval_file"])]
    assert all(r["output"] for r in train + dev)  # empty answers dropped
    assert not {r["output"] for r in train} & {r["output"] for r in dev}
    assert job["warmup_steps"] == 2  # 3 % of 50 steps, rounded up


def test_skipped_with_the_reason_when_the_model_cannot_be_had(alpaca, tmp_path, monkeypatch):
    def missing(name, shared):
        raise RecipeMissing(f"no recipe at {shared}/models/{name}/make.py")
    monkeypatch.setattr(run, "built_model", missing)
    with pytest.raises(run.Skip, match="no recipe at"):
        prepared(alpaca, tmp_path)

    def broken(name, shared):
        raise RuntimeError("make.py failed (exit 1): error: pip failed")
    monkeypatch.setattr(run, "built_model", broken)
    with pytest.raises(run.Skip, match="building smollm2-135m-instruct failed: .*pip failed"):
        prepared(alpaca, tmp_path)


def test_the_peer_batches_by_length_unless_told_otherwise(tmp_path):
    job = {**run.WORKLOADS["lora-smollm"], "steps": 3, "out_dir": str(tmp_path), "extra": []}
    assert run._trainer_args(job).train_sampling_strategy == "group_by_length"
    job["extra"] = ["train_sampling_strategy=random"]  # --trainer-arg still wins
    assert run._trainer_args(job).train_sampling_strategy == "random"
    assert run._trainer_args({**run.WORKLOADS["lora"], "steps": 3, "out_dir": str(tmp_path),
                              "extra": []}).train_sampling_strategy == "random"


def test_results_name_the_peers_setting():
    side = {"samples_per_s": 2.0, "tokens_per_s": 300.0, "target_tokens_per_s": 90.0,
            "tflops": 0.1, "peak_rss_mb": 2000.0, "cuda_peak_mb": 0, "train_loss": 1.9,
            "eval_loss": 1.8, "accuracy": None, "padding": 0.02, "steps": 3, "ckpt_s": 0.5,
            "samples_per_s_no_ckpt": 2.1}
    settings = {"trainer_args": ["train_sampling_strategy=group_by_length"]}
    results = {"meta": {"date": "2026-11-27", "machine": "CPU", "command": "python -m bench",
                        "torch": "2", "transformers": "5", "peft": "0", "accelerate": "1",
                        "repeats": 1, "steps": 3, "cuda": False},
               "workloads": {"lora-smollm": {"settings": settings, "summary": {
                   "rawtune": side, "trainer": side}}}}
    notes = run.markdown(results).splitlines()
    assert "- lora-smollm: HF Trainer with train_sampling_strategy=group_by_length" in notes
