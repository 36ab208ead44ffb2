"""The scripts themselves under torchrun: 2 CPU processes (gloo) against 1 process.

Each script is launched the way users launch it — `torchrun --standalone
--nproc_per_node 2 train_cls.py ...` — on a tiny dropout-free model saved to disk and
rows the project ships. Two ranks with micro-batches of 4 see the same global batches
as one process accumulating two micro-batches of 4 (length grouping off, so both
orders are the plain shuffle), so logs, metrics and saved weights must agree to
float rounding; --fsdp must too, while holding half the state per process, and so must
LoRA on a 4-bit base (each process quantises the same weights to the same bits). One
sharded run is stopped by SIGTERM to the torchrun process, as a cluster scheduler
stops a job, and resumed: it must repeat the uninterrupted run bit for bit.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_lora
from conftest import MEASURED
from core.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def command(script: str, world: int) -> list[str]:
    if world == 1:
        return [sys.executable, str(ROOT / script)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={world}", str(ROOT / script)]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def launch(script: str, world: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(script, world) + list(args), env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def records(out: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in rows if r["type"] == kind]


def write_rows(path: Path, rows: list[str]) -> str:
    path.write_text("".join(rows))
    return str(path)


def stop_through_launcher(script: str, out: Path, args: list[str],
                          after_steps: int) -> subprocess.CompletedProcess:
    """Start a 2-process run and SIGTERM the torchrun process once `after_steps` are logged."""
    proc = subprocess.Popen(command(script, 2) + args, env=env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out / "train_log.jsonl", time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and log.read_text().count('"train"') >= after_steps:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


# --- train_cls.py --------------------------------------------------------------------

@pytest.fixture(scope="module")
def cls_runs(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification

    from core.demo import data_file, tiny_distilbert_config, wordpiece_tokenizer
    root = tmp_path_factory.mktemp("launch-cls")
    lines = Path(data_file("sentiment.jsonl")).read_text().splitlines(keepends=True)
    train, evaluation = lines[:64], lines[64:89]  # 25 eval rows: 2 ranks split them unevenly
    texts = [json.loads(line)["text"] for line in train]
    model_dir = root / "base"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(
        tiny_distilbert_config(2000, max_length=64, dropout=0.0)).save_pretrained(model_dir)
    wordpiece_tokenizer(texts, max_length=64).save_pretrained(model_dir)
    common = ["--model", str(model_dir), "--train-file", write_rows(root / "train.jsonl", train),
              "--eval-file", write_rows(root / "eval.jsonl", evaluation), "--epochs", "4",
              "--lr", "1e-3", "--warmup-steps", "2", "--max-length", "64",
              "--eval-batch-size", "8", "--no-group-by-length", "--batch-size", "4"]
    out = {name: root / name for name in ("single", "ddp", "fsdp", "stopped")}
    done = {"single": launch("train_cls.py", 1, *common, "--grad-accum", "2", "--cpu-memory",
                             "reuse", "--output-dir", str(out["single"])),
            "ddp": launch("train_cls.py", 2, *common, "--output-dir", str(out["ddp"])),
            "fsdp": launch("train_cls.py", 2, *common, "--fsdp", "--output-dir", str(out["fsdp"])),
            "stopped": stop_through_launcher("train_cls.py", out["stopped"],
                                             common + ["--fsdp", "--output-dir",
                                                       str(out["stopped"])], after_steps=3)}
    for name in ("single", "ddp", "fsdp"):
        assert done[name].returncode == 0, done[name].stderr[-3000:]
    out["checkpoints at stop"] = sorted((out["stopped"] / "checkpoints").glob("step-*"))
    done["resumed"] = launch("train_cls.py", 2, *common, "--fsdp", "--output-dir",
                             str(out["stopped"]), "--resume-from", "latest")
    assert done["resumed"].returncode == 0, done["resumed"].stderr[-3000:]
    return out, done


def test_cls_two_processes_join_one_run(cls_runs):
    out, done = cls_runs
    config = json.loads((out["ddp"] / "config.json").read_text())
    assert config["world_size"] == 2
    assert "32 optimizer steps" in done["ddp"].stderr and "2 device(s)" in done["ddp"].stderr
    assert done["ddp"].stderr.count("optimizer steps") == 1  # only rank 0 reports
    # --cpu-memory: as asked, and by default (auto) `return` for a model this small.
    assert "CPU memory: reuse" in done["single"].stderr
    assert "CPU memory: return" in done["ddp"].stderr
    # One record per optimizer step and per evaluation: a second writer would double them.
    assert [r["step"] for r in records(out["ddp"])] == list(range(1, 33))
    assert [r["step"] for r in records(out["ddp"], "eval")] == [8, 16, 24, 32]


@pytest.mark.parametrize("run", ["ddp", "fsdp"])
def test_cls_two_processes_train_like_one_with_accumulation(cls_runs, run):
    out, _ = cls_runs
    many, one = records(out[run]), records(out["single"])
    assert len(many) == len(one) == 32
    for a, b in zip(many, one):
        assert a["units"] == b["units"] == 8
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["lr"] == b["lr"]
    metrics = [json.loads((out[k] / "metrics.json").read_text()) for k in (run, "single")]
    for key in ("accuracy", "precision", "recall", "f1", "confusion_matrix", "n_eval"):
        assert metrics[0][key] == metrics[1][key], key
    assert metrics[0]["loss"] == pytest.approx(metrics[1]["loss"], rel=1e-5)
    # The saved model is whole (under --fsdp: gathered from the shards) and equal.
    got, want = (load_file(out[k] / "model" / "model.safetensors") for k in (run, "single"))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
    preds = [json.loads(line) for line in (out[run] / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 25


def test_cls_fsdp_holds_half_the_state_per_process(cls_runs):
    out, _ = cls_runs
    mib = {k: json.loads((out[k] / "metrics.json").read_text())["state_mib_per_device"]
           for k in ("single", "ddp", "fsdp")}
    assert mib["ddp"] == pytest.approx(mib["single"])  # every process holds it all
    assert 0.45 * mib["ddp"] < mib["fsdp"] < 0.55 * mib["ddp"]


def test_cls_fsdp_model_serves_its_predictions(cls_runs):
    from transformers import pipeline
    out, _ = cls_runs
    config = json.loads((out["fsdp"] / "model" / "config.json").read_text())
    assert config["architectures"] == ["DistilBertForSequenceClassification"]
    classify = pipeline("text-classification", model=str(out["fsdp"] / "model"), device="cpu")
    rows = [json.loads(line) for line in (out["fsdp"].parent / "eval.jsonl").read_text()
            .splitlines()]
    preds = [json.loads(line) for line in (out["fsdp"] / "predictions.jsonl").read_text()
             .splitlines()]
    served = classify([r["text"] for r in rows[:8]], truncation=True, max_length=64)
    names = config["id2label"]
    assert [s["label"] for s in served] == [names[str(p["prediction"])] for p in preds[:8]]


def test_sigterm_to_the_launcher_checkpoints_once_and_resumes_bit_exact(cls_runs):
    out, done = cls_runs
    stopped = done["stopped"]
    assert stopped.returncode != 0
    assert stopped.stderr.count("error: interrupted at step") == 1, stopped.stderr[-3000:]
    assert "--resume-from latest" in stopped.stderr
    assert stopped.stderr.count("checkpoint saved:") == 1  # once, by rank 0's report
    (path,) = out["checkpoints at stop"]
    saved = json.loads((path / "trainer_state.json").read_text())
    assert 3 <= saved["step"] < 32 and saved["plan"]["fsdp"] is True
    assert f"resumed at step {saved['step']}" in done["resumed"].stderr
    assert records(out["stopped"]) == records(out["fsdp"])
    assert records(out["stopped"], "eval") == records(out["fsdp"], "eval")
    got, want = (load_file(out[k] / "model" / "model.safetensors") for k in ("stopped", "fsdp"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_an_fsdp_checkpoint_is_verified_and_every_file_loads_without_pickle(cls_runs):
    """Issue #10, items 1 and 3 under --fsdp: the manifest covers both ranks' shards, and
    every stored value (each a torch.save blob inside the .distcp files, found through the
    .metadata file read by a restricted unpickler) loads with weights_only=True."""
    from core import manifest, sharded
    out, _ = cls_runs
    path = out["fsdp"] / "checkpoints" / "step-000032"
    listed = json.loads((path / manifest.NAME).read_text())["files"]
    assert sorted(listed) == ["rng_rank0.pt", "rng_rank1.pt", "sharded/.metadata",
                              "sharded/__0_0.distcp", "sharded/__1_0.distcp",
                              "trainer_state.json"]
    assert manifest.problem(path) is None
    json.loads((path / "trainer_state.json").read_text())
    for rank in (0, 1):
        torch.load(path / f"rng_rank{rank}.pt", weights_only=True)
    metadata = sharded.read_metadata(path / "sharded")
    assert {info.relative_path for info in metadata.storage_data.values()} == {
        "__0_0.distcp", "__1_0.distcp"}
    for info in metadata.storage_data.values():
        with (path / "sharded" / info.relative_path).open("rb") as f:
            f.seek(info.offset)
            torch.load(io.BytesIO(f.read(info.length)), weights_only=True)


def test_a_new_run_in_one_process_starts_from_an_fsdp_checkpoint(cls_runs, tmp_path,
                                                                 first_forward):
    """--init-from gathers every rank's shards in one process, no launcher needed."""
    import train_cls
    from core.errors import run_cli
    from tasks.classification import ClassificationTask
    out, _ = cls_runs
    config = json.loads((out["fsdp"] / "config.json").read_text())
    seen = first_forward(ClassificationTask)
    assert run_cli(train_cls.main, [
        "--model", config["model"], "--train-file", config["train_file"], "--eval-file",
        config["eval_file"], "--max-length", "64", "--max-steps", "1", "--output-dir",
        str(tmp_path / "x"), "--init-from", str(out["fsdp"] / "checkpoints" / "step-000032")]) == 0
    final = load_file(out["fsdp"] / "model" / "model.safetensors")
    assert seen and all(torch.equal(tensor, final[name]) for name, tensor in seen.items())


def test_a_resume_under_another_launch_names_the_one_it_needs(cls_runs):
    out, _ = cls_runs
    config = json.loads((out["fsdp"] / "config.json").read_text())
    args = ["--model", config["model"], "--train-file", config["train_file"], "--eval-file",
            config["eval_file"], "--epochs", "4", "--lr", "1e-3", "--warmup-steps", "2",
            "--max-length", "64", "--eval-batch-size", "8", "--no-group-by-length",
            "--batch-size", "4", "--output-dir", str(out["fsdp"]), "--resume-from", "latest"]
    before = (out["fsdp"] / "train_log.jsonl").read_text()
    proc = launch("train_cls.py", 1, *args)  # one process, no --fsdp
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    made_by, this_run = line.split("; this run has ")
    assert "world_size=2" in made_by and "fsdp=True" in made_by
    assert "world_size=1" in this_run and "fsdp=False" in this_run
    assert "launched as 2 process(es) (torchrun --nproc_per_node 2), with --fsdp" in line
    assert (out["fsdp"] / "train_log.jsonl").read_text() == before


# --- train_lora.py -------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from core.demo import bpe_tokenizer, data_file, tiny_llama_config
    root = tmp_path_factory.mktemp("launch-lora")
    lines = Path(data_file("qa.jsonl")).read_text().splitlines(keepends=True)
    train, evaluation = lines[:64], lines[64:83]
    texts = [v for line in train for v in json.loads(line).values() if v]
    tokenizer = bpe_tokenizer(texts, max_length=128)
    model_dir = root / "base"
    torch.manual_seed(0)
    config = tiny_llama_config(len(tokenizer), max_length=128)
    config.update({"pad_token_id": tokenizer.pad_token_id,
                   "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id})
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    common = ["--model", str(model_dir), "--train-file", write_rows(root / "train.jsonl", train),
              "--eval-file", write_rows(root / "eval.jsonl", evaluation), "--lora-r", "4",
              "--lora-dropout", "0", "--epochs", "2", "--lr", "1e-2", "--warmup-steps", "1",
              "--max-length", "128", "--no-group-by-length", "--batch-size", "4",
              "--eval-batch-size", "4", "--sample-prompt", "Name a colour.",
              "--sample-max-new-tokens", "8"]
    out = {name: root / name for name in ("single", "ddp", "fsdp", "single-4bit", "ddp-4bit")}
    done = {"single": launch("train_lora.py", 1, *common, "--grad-accum", "2",
                             "--output-dir", str(out["single"])),
            "ddp": launch("train_lora.py", 2, *common, "--output-dir", str(out["ddp"])),
            "fsdp": launch("train_lora.py", 2, *common, "--fsdp", "--gradient-checkpointing",
                           "--merge", "--output-dir", str(out["fsdp"])),
            "ddp-4bit": launch("train_lora.py", 2, *common, "--load-in-4bit",
                               "--gradient-checkpointing", "--output-dir", str(out["ddp-4bit"]))}
    for name, proc in done.items():
        assert proc.returncode == 0, proc.stderr[-3000:]
    # Its one-process counterpart runs in this process: a launch fewer.
    assert run_cli(train_lora.main, [*common, "--load-in-4bit", "--gradient-checkpointing",
                                     "--grad-accum", "2", "--output-dir",
                                     str(out["single-4bit"])]) == 0
    return out, done


@pytest.mark.parametrize("run", ["ddp", "fsdp", "ddp-4bit"])
def test_lora_two_processes_train_like_one_with_accumulation(lora_runs, run):
    out, _ = lora_runs
    single = "single-4bit" if run.endswith("4bit") else "single"  # on the same kind of base
    assert json.loads((out[run] / "config.json").read_text())["world_size"] == 2
    many, one = records(out[run] / "r4"), records(out[single] / "r4")
    assert [r["step"] for r in many] == [r["step"] for r in one] == list(range(1, 17))
    for a, b in zip(many, one):
        assert a["units"] == b["units"]  # target tokens of the whole global batch
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    metrics = [json.loads((out[k] / "r4" / "metrics.json").read_text()) for k in (run, single)]
    assert metrics[0]["n_eval_tokens"] == metrics[1]["n_eval_tokens"]
    assert metrics[0]["eval_loss"] == pytest.approx(metrics[1]["eval_loss"], rel=1e-5)
    got, want = (load_file(out[k] / "r4" / "adapter" / "adapter_model.safetensors")
                 for k in (run, single))
    assert got.keys() == want.keys() and any("lora_B" in k for k in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def test_lora_fsdp_adapter_and_merge_load_as_usual(lora_runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out, _ = lora_runs
    mib = {k: json.loads((out[k] / "r4" / "metrics.json").read_text())["state_mib_per_device"]
           for k in ("ddp", "fsdp")}
    assert 0.45 * mib["ddp"] < mib["fsdp"] < 0.55 * mib["ddp"]  # the frozen base is sharded too
    base = AutoModelForCausalLM.from_pretrained(out["fsdp"].parent / "base")
    model = PeftModel.from_pretrained(base, out["fsdp"] / "r4" / "adapter").merge_and_unload()
    merged = load_file(out["fsdp"] / "r4" / "merged" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(merged[name], tensor)


@pytest.mark.parametrize("run", ["ddp", "fsdp"])
def test_lora_samples_come_from_rank_zero_without_a_deadlock(lora_runs, run):
    """Rank 0 alone answers (under --fsdp through the saved adapter on a fresh base); the
    runs finished, so no rank waited forever in a collective."""
    out, done = lora_runs
    assert "| Name a colour. |" in (out[run] / "samples.md").read_text()
    assert done[run].stdout.count("Samples") == 1  # one table, from rank 0
    for name in ("samples_base.json", "r4/samples.json"):
        answers = json.loads((out[run] / name).read_text())["answers"]
        assert len(answers) == 1 and isinstance(answers[0], str)


def test_accelerate_launch_starts_one_run_of_two_processes(tmp_path):
    # Without a GPU, `accelerate launch` starts several processes with --multi_gpu only.
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                           "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                           "no", "--dynamo_backend", "no", str(ROOT / "train_cls.py"), "--demo",
                           "--max-steps", "4", "--output-dir", str(tmp_path / "x")],
                          env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "x" / "config.json").read_text())["world_size"] == 2
    assert [r["step"] for r in records(tmp_path / "x")] == [1, 2, 3, 4]


# --- refusals --------------------------------------------------------------------------

def test_a_launched_rank_leaves_with_its_code_and_without_the_interpreters_teardown():
    # That teardown can abort a rank whose FSDP group outlives destroy_process_group.
    code = ("import atexit; from core.parallel import leave; atexit.register(print, 'teardown'); "
            "print('trained', end=''); leave(3)")
    def run(extra: dict) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], env={**env(), **extra}, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    launched, alone = run({"LOCAL_RANK": "0"}), run({})
    assert (launched.returncode, launched.stdout) == (3, "trained")  # flushed, no teardown
    assert (alone.returncode, alone.stdout) == (0, "trainedteardown\n")


def test_a_launched_process_that_would_train_alone_refuses(tmp_path):
    # WORLD_SIZE without the rest of torchrun's environment: no group can be joined.
    proc = subprocess.run(command("train_cls.py", 1) + ["--demo", "--output-dir",
                          str(tmp_path / "x")], env={**env(), "WORLD_SIZE": "2"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: the launcher started 2 processes but this one would train alone")
    assert not (tmp_path / "x").exists()


def test_fsdp_without_a_launcher_is_refused(tmp_path):
    proc = launch("train_lora.py", 1, "--demo", "--fsdp", "--output-dir", str(tmp_path / "x"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --fsdp shards the model")
    assert not (tmp_path / "x").exists()


def test_ranks_launched_with_different_flags_refuse_together(tmp_path):
    """Rank 1 alone gets another --lr (as a node with another config file would)."""
    script = tmp_path / "uneven.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from core.errors import run_cli\nfrom train_cls import main\n"
        "extra = ['--lr', '2e-3'] if os.environ['RANK'] == '1' else []\n"
        "sys.exit(run_cli(main, sys.argv[1:] + extra))\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), "--demo", "--output-dir",
                           str(tmp_path / "x")], env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("error: the 2 processes disagree on lr") == 1, proc.stderr[-2000:]
    assert not (tmp_path / "x").exists()
