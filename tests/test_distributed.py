"""Data parallelism on CPU: two gloo ranks under torchrun against one process.

The 2-rank jobs run once per module (they dominate its time): a full run, a run whose
rank 1 alone is sent SIGTERM, that run resumed, and a sharded run whose rank 1 alone
fails to write a checkpoint. tests/dist_worker.py drives
core.loop.train on a tiny dropout-free DistilBERT and synthetic rows; the full run and
its 1-rank counterpart then train a tiny Llama with LoRA (`--also lm`) in the same
job, for the token-weighted half of the proof.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import MEASURED

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_worker.py"
pytestmark = pytest.mark.slow


def launch(out: Path, *args: str, world: int = 2,
           stdio: str = "stdio") -> subprocess.CompletedProcess:
    if world == 1:
        cmd = [sys.executable, str(WORKER)]
    else:  # torchrun, not `accelerate launch`: it needs no config file, and Accelerate
        # still picks gloo on CPU (asserted below).
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}", str(WORKER)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd + ["--out", str(out), "--stdio", str(out / stdio), *args],
                          env=env, capture_output=True, text=True, timeout=600)


def stdio(out: Path, rank: int, stream: str = "err", name: str = "stdio") -> str:
    return (out / name / f"rank{rank}.{stream}").read_text()


def records(out: Path, kind: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in MEASURED}
            for r in rows if kind is None or r["type"] == kind]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    done = {
        # 2 ranks x micro-batch 4 against 1 rank x 2 accumulated micro-batches of 4.
        # Each then trains the LM task the same way, in the same job.
        "ddp": launch(root / "ddp", "--also", "lm", str(root / "lm-ddp")),
        "single": launch(root / "single", "--grad-accum", "2", "--also", "lm",
                         str(root / "lm-single"), world=1),
        # Rank 1 alone is signalled during step 7: both ranks must stop after the same step.
        "stopped": launch(root / "resumed", "--signal-rank", "1", "--signal-at", "7",
                          stdio="stopped"),
    }
    done["resumed"] = launch(root / "resumed", "--resume")
    # Sharded, rank 1's disk fails (EIO) in the second save (step 10).
    done["failed save"] = launch(root / "failed-save", "--fsdp", "--fail-save-rank", "1",
                                 "--fail-save-at", "2")
    for name, proc in done.items():
        # torchrun exits 1 when a worker fails; the workers' own codes are checked below.
        assert proc.returncode == (0 if name in ("ddp", "single", "resumed") else 1), \
            proc.stderr[-3000:]
    return {name: root / name for name in ("ddp", "single", "resumed", "lm-ddp", "lm-single",
                                           "failed-save")}


def test_two_ranks_train_like_one_rank_with_accumulation(runs):
    ddp, single = records(runs["ddp"], "train"), records(runs["single"], "train")
    assert [r["step"] for r in ddp] == list(range(1, 13))
    for a, b in zip(ddp, single):
        assert a["units"] == b["units"] == 8  # each step's loss is a mean over all 8 examples
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["lr"] == b["lr"]
    final_ddp = torch.load(runs["ddp"] / "final.pt")
    for name, tensor in torch.load(runs["single"] / "final.pt").items():
        torch.testing.assert_close(final_ddp[name], tensor, rtol=1e-5, atol=1e-6)


def test_eval_metrics_over_an_uneven_split_equal_one_process(runs):
    ddp = json.loads((runs["ddp"] / "result.json").read_text())
    single = json.loads((runs["single"] / "result.json").read_text())
    assert ddp["world"] == 2 and single["world"] == 1
    # Same weights on both sides (before training): 37 examples over 2 ranks, each once.
    a, b = ddp["initial_eval"], single["initial_eval"]
    assert a["n_eval"] == b["n_eval"] == 37
    assert ddp["initial_predictions"] == single["initial_predictions"]
    for key in ("accuracy", "precision", "recall", "f1", "confusion_matrix", "per_class"):
        assert a[key] == b[key], key
    # The mean loss is a float sum: ranks batch (and so pad) their shards differently.
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert ddp["final_eval"]["n_eval"] == 37


def test_only_rank_zero_reports_and_writes(runs):
    out = runs["ddp"]
    for rank in (0, 1):  # Accelerate chose gloo for CPU data parallelism
        assert f"rank {rank} of 2, backend gloo, MULTI_CPU" in stdio(out, rank, "out")
    err0, err1 = stdio(out, 0), stdio(out, 1)
    assert "12 optimizer steps" in err0 and "12/12" in err0 and "checkpoint saved" in err0
    for text in ("optimizer steps", "/12", "checkpoint saved", "eval @"):
        assert text not in err1 and text not in stdio(out, 1, "out")
    # One record per step and per evaluation: a second writer would double them.
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5, 6, 6, 7, 8, 9, 10, 11, 12, 12]
    assert sorted(p.name for p in out.iterdir()) == \
        ["checkpoints", "final.pt", "result.json", "stdio", "train_log.jsonl"]
    ckpt = out / "checkpoints" / "step-000012"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "manifest.json", "model.pt", "optimizer.pt", "rng_rank0.pt", "rng_rank1.pt",
        "trainer_state.json"]


def test_a_signal_on_one_rank_stops_all_at_the_same_step(runs):
    out = runs["resumed"]  # the stopped run's directory, resumed since
    # Rank 1 is signalled in step 7; every rank learns it from step 8's all-reduce and
    # acts on it at the next read-back of the figures: with --log-every 4 after the one
    # at step 6's evaluation, that is step 10.
    err = stdio(out, 0, name="stopped")
    assert "error: interrupted at step 10 of 12" in err and "--resume-from latest" in err
    assert "error:" not in stdio(out, 1, name="stopped")  # one rank says it for all
    for rank in (0, 1):
        assert f"rank {rank} done, exit 143" in stdio(out, rank, "out", name="stopped")
    state = json.loads((out / "checkpoints" / "step-000010" / "trainer_state.json").read_text())
    assert state["step"] == 10 and state["plan"]["world_size"] == 2


def test_resumed_two_rank_run_is_bit_exact(runs):
    assert "resumed at step 10" in stdio(runs["resumed"], 0)
    assert records(runs["resumed"]) == records(runs["ddp"])
    got, want = torch.load(runs["resumed"] / "final.pt"), torch.load(runs["ddp"] / "final.pt")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_save_failing_on_one_rank_ends_every_rank_with_one_line(runs):
    """Issue #10, item 2: every rank learns of rank 1's failure, so none waits for it."""
    from core import manifest
    out = runs["failed-save"]
    ckpts = out / "checkpoints"
    errors = [line for line in stdio(out, 0).splitlines() if line.startswith("error:")]
    assert errors == [f"error: saving checkpoint step-000010 failed: Input/output error: "
                      f"{ckpts}/.tmp-step-000010/sharded (rank 1); the partial checkpoint was "
                      f"removed and the last good one, {ckpts / 'step-000005'}, is kept — once "
                      f"{ckpts} has room and can be written, continue with the same command "
                      f"and --resume-from latest --output-dir {out}"]
    assert "error:" not in stdio(out, 1)  # one rank says it for all
    for rank in (0, 1):
        assert f"rank {rank} done, exit 1" in stdio(out, rank, "out")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000005"]
    assert manifest.problem(ckpts / "step-000005") is None


RTOL = 1e-5  # fp32: the two runs add the same numbers in different orders


def lm_results(runs) -> tuple[dict, dict]:
    ddp = json.loads((runs["lm-ddp"] / "result.json").read_text())
    single = json.loads((runs["lm-single"] / "result.json").read_text())
    assert (ddp["task"], ddp["world"], ddp["grad_accum"]) == ("lm", 2, 1)
    assert (single["task"], single["world"], single["grad_accum"]) == ("lm", 1, 2)
    return ddp, single


def micro_by_step(result: dict) -> list[list[dict]]:
    """The step's micro-batches: one per rank (2 ranks) or per accumulation (1 rank)."""
    per_step = result["grad_accum"]  # micro-batches per rank and step
    steps: dict[int, list[dict]] = {}
    for m in result["micro"]:
        steps.setdefault(m["call"] // per_step, []).append(m)
    return [sorted(steps[k], key=lambda m: (m["rank"], m["call"])) for k in sorted(steps)]


def test_lora_on_two_ranks_trains_like_one_rank_with_accumulation(runs):
    """Token-weighted loss: unequal target tokens per rank, yet the same steps as 1 rank."""
    ddp_result, single_result = lm_results(runs)
    ddp, single = records(runs["lm-ddp"], "train"), records(runs["lm-single"], "train")
    ddp_micro, single_micro = micro_by_step(ddp_result), micro_by_step(single_result)
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == list(range(1, 13))
    assert len(ddp_micro) == len(single_micro) == 12
    for a, b, dm, sm in zip(ddp, single, ddp_micro, single_micro):
        assert [m["rank"] for m in dm] == [0, 1] and [m["rank"] for m in sm] == [0, 0]
        # Both runs see the same rows in each step, split differently (ranks take
        # every other row of the global batch; accumulation takes halves in turn).
        assert sorted(r for m in dm for r in m["rows"]) == sorted(r for m in sm for r in m["rows"])
        assert all(len(m["rows"]) == 4 for m in dm + sm)
        # The ranks' micro-batches hold different numbers of target tokens.
        assert dm[0]["units"] != dm[1]["units"], a["step"]
        assert a["units"] == b["units"] == sum(m["units"] for m in dm) == sum(m["units"] for m in sm)
        # The logged loss is the sum of token losses over the global target-token count.
        assert a["loss"] == pytest.approx(sum(m["loss_sum"] for m in dm) / a["units"], rel=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=RTOL)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["lr"] == b["lr"]
    final_ddp, final_single = (torch.load(runs[k] / "final.pt") for k in ("lm-ddp", "lm-single"))
    lora = [k for k in final_single if "lora_" in k]
    assert len(lora) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    # LoRA's B starts at zero: it must have moved, or equal weights would prove nothing.
    assert max(final_single[k].abs().max().item() for k in lora if "lora_B" in k) > 1e-3
    for name in lora:
        torch.testing.assert_close(final_ddp[name], final_single[name], rtol=RTOL, atol=1e-7)
    for name in set(final_single) - set(lora):  # the frozen base is untouched on both
        assert torch.equal(final_ddp[name], final_single[name]), name


def test_mean_of_rank_means_would_fail_the_lora_comparison(runs):
    """Control: the common shortcut, each rank's own token mean averaged over ranks,
    computed from the same micro-batches, misses the 1-rank losses by far more than
    the tolerance the test above allows, so that test can tell the two apart."""
    ddp_result, _ = lm_results(runs)
    single = records(runs["lm-single"], "train")
    errors = []
    for b, dm in zip(single, micro_by_step(ddp_result)):
        naive = sum(m["loss_sum"] / m["units"] for m in dm) / len(dm)
        errors.append(abs(naive - b["loss"]) / b["loss"])
    assert max(errors) > 100 * RTOL, errors
    assert sum(e > RTOL for e in errors) >= 9, errors  # most steps, not one outlier


def test_lm_eval_over_an_uneven_split_equals_one_process(runs):
    ddp, single = lm_results(runs)
    a, b = ddp["initial_eval"], single["initial_eval"]
    assert a["n_eval"] == b["n_eval"] == 37 and a["n_eval_tokens"] == b["n_eval_tokens"]
    # Exact, not approximate: the eval batch holds one row, so each row's fp32 loss sum
    # comes from the same unpadded input on either side; ranks only add those sums in
    # another order, in float64, where 37 fp32 values of similar size add up exactly.
    assert a == b
    # Padded batches of 4 differ by shard (other rows, other padding), so their fp32
    # sums differ in the last bits: equal to fp32 rounding, not exactly.
    a4, b4 = ddp["initial_eval_batch4"], single["initial_eval_batch4"]
    assert a4["n_eval_tokens"] == a["n_eval_tokens"] and a4["n_eval"] == 37
    assert a4["loss"] == pytest.approx(b4["loss"], rel=1e-6)
    assert a4["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert ddp["final_eval"]["loss"] == pytest.approx(single["final_eval"]["loss"], rel=RTOL)
