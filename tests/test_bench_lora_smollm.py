"""The benchmark's real LoRA workload, lora-smollm: its rows and its model from the test cache,
a skip that says why without ../shared, a failure when the model's recipe fails. No
training here."""

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


def prepared(alpaca, tmp_path, steps=0, *flags: str) -> dict:
    args = run.parse_args(["--alpaca-file", str(alpaca), "--steps", str(steps),
                           "--mixed-precision", "no", *flags])
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

    def broken(name, shared):  # the recipe is there but fails: a failure, not a skip
        raise RuntimeError("make.py failed (exit 1): error: pip failed")
    monkeypatch.setattr(run, "built_model", broken)
    with pytest.raises(run.PrepareFailed,
                       match="building smollm2-135m-instruct failed: .*pip failed"):
        prepared(alpaca, tmp_path)


def test_steps_keep_the_rows_of_that_many_steps(alpaca, tmp_path, monkeypatch):
    monkeypatch.setattr(run, "built_model", lambda name, shared: tmp_path / "cache" / name)
    job = prepared(alpaca, tmp_path, steps=5)
    assert (job["n_train"], job["n_eval"]) == (40, 100)  # 5 steps of 8 rows, every eval row
    assert job["warmup_steps"] == 1


def test_a_batch_size_given_holds_for_both_sides_and_the_step_cap(alpaca, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(run, "built_model", lambda name, shared: tmp_path / "cache" / name)
    job = prepared(alpaca, tmp_path, 5, "--batch-size", "4")  # each side reads job's
    assert job["batch_size"] == 4 and job["n_train"] == 20  # 5 steps of 4 rows
    assert run.WORKLOADS["lora-smollm"]["batch_size"] == 8  # the workload itself unchanged
