"""rawtune against HF `Trainer`: same model, data, hyperparameters and optimizer steps.

    python -m bench                                   # every workload whose assets are here
    python -m bench --workloads cls-short --steps 20 --repeats 2

Each side of each workload runs in a fresh subprocess (`python -m bench.run --child
SPEC`), so its peak memory is its own, and the sides alternate (rawtune, Trainer,
rawtune, Trainer, ...) so that drift in the machine's load hits both alike.

What is timed, on both sides alike: the wall clock of the training call — rawtune's
`core.loop.train` (minus the time its end-of-run evaluation takes) and `Trainer.train()`
(run with no evaluation) — each including its own setup (optimizer, accelerator
preparation, data loader). Samples and tokens are counted by a forward pre-hook on the
model during training, so both sides count exactly the batches they trained on.
Evaluation afterwards is untimed; accuracy and losses come from each side's model.

The rawtune side runs the real pipeline: `train_cls.main([...flags])` for
classification, `core.loop.train` with `tasks.instruct`'s task for LoRA.
"""

import argparse
import datetime
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.shared_models import RecipeMissing, built_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEMO_DATA = ROOT / "core" / "demo_data"
# The peer twice: as users leave it (its default random sampler pads each batch to its
# longest row) and at its best (its own length grouping, one setting), so the headline
# ratio is against a well-configured Trainer.
SIDES = ("rawtune", "trainer", "trainer-grouped")
PEERS = ("trainer", "trainer-grouped")
SIDE_NAMES = {"rawtune": "rawtune", "trainer": "HF Trainer (default sampler)",
              "trainer-grouped": "HF Trainer (group_by_length)"}

# Every workload: what it trains, on what, with which hyperparameters (both sides).
WORKLOADS = {
    "cls-short": dict(kind="cls", gpu=False, model="minilm", data="sst2", n_train=4000,
                      lr=2e-5, batch_size=16, epochs=1, max_length=512, weight_decay=0.01),
    "cls-long": dict(kind="cls", gpu=False, model="minilm", data="long", lr=2e-5,
                     batch_size=16, epochs=1, max_length=512, weight_decay=0.01),
    # A model too small to keep a CPU busy: what is left is each side's per-step host
    # work, the regime a small model is in on a GPU.
    "cls-tiny": dict(kind="cls", gpu=False, model="distilbert-tiny", data="sst2", n_train=4000,
                     lr=2e-5, batch_size=16, epochs=1, max_length=512, weight_decay=0.01),
    "lora": dict(kind="lm", gpu=False, model="llama-small", data="alpaca", lr=2e-4,
                 batch_size=8, epochs=1, max_length=512, weight_decay=0.0),
    # A real pretrained chat model (../shared's SmolLM2-135M-Instruct recipe) on a real
    # 49,152-token vocabulary, where the LM head is a fifth of the weights. A slice of the
    # rows, so a CPU run ends.
    "lora-smollm": dict(kind="lm", gpu=False, model="smollm2-135m-instruct", data="alpaca",
                        n_train=400, n_eval=100, lr=2e-4, batch_size=8, epochs=1,
                        max_length=512, weight_decay=0.0),
    "gpu-distilbert": dict(kind="cls", gpu=True, model="distilbert-base", data="long", lr=2e-5,
                           batch_size=16, epochs=4, max_length=512, weight_decay=0.01,
                           mixed_precision="bf16"),
    "gpu-openllama-3b": dict(kind="lm", gpu=True, model="openllama-3b", data="alpaca", lr=2e-4,
                             batch_size=8, epochs=1, max_length=512, weight_decay=0.0,
                             mixed_precision="bf16"),
}
SEED = 42
EVAL_BATCH = 64
# train_lora.py's defaults (alpha 2r, every projection), pinned here for both sides.
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"])
WARMUP_RATIO_LM = 0.03  # train_lora.py's default, given to both sides as a step count
BPE_VOCAB = 8000  # the byte-level BPE trained on the rows of the Llama workloads
LLAMA_SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4)
OPENLLAMA_3B = dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26,
                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
PRETRAINED_LMS = ("smollm2-135m-instruct",)  # built from ../shared/models/NAME/make.py
ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONWARNINGS": "ignore"}


class Skip(Exception):
    """A workload that cannot run here; the message says why."""


class PrepareFailed(Exception):
    """A workload whose assets are here but could not be made ready: a failure."""


# ---------------------------------------------------------------- data, shared by both sides

def read_sst2(path: Path) -> list[dict]:
    """GLUE SST-2: one tab per line, no quoting, text stripped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for line in lines[1:]:
        text, label = line.rsplit("\t", 1)
        rows.append({"text": text.strip(), "label": int(label)})
    return rows


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def prepare(name: str, spec: dict, args, work: Path, on_gpu: bool) -> dict:
    """Files both sides read: data, tokenizer, model directory. Raises Skip when absent."""
    if spec["gpu"] and not on_gpu:
        raise Skip("needs CUDA, none here")
    if args.batch_size:  # both sides: the micro-batch is the workload's setting to vary
        spec = {**spec, "batch_size": args.batch_size}
    wdir = work / name
    wdir.mkdir(parents=True, exist_ok=True)
    job = {**spec, "workload": name, "steps": args.steps, "peak_tflops": args.peak_tflops}
    if args.mixed_precision:  # both sides: rawtune's autocast, Trainer's bf16=True
        job["mixed_precision"] = args.mixed_precision
    minilm = SHARED / "models" / "all-MiniLM-L6-v2"

    if spec["kind"] == "cls":
        if spec["data"] == "sst2":
            train_tsv, dev_tsv = SHARED / "data/sst2/train.tsv", SHARED / "data/sst2/dev.tsv"
            if not (train_tsv.exists() and dev_tsv.exists()):
                raise Skip(f"SST-2 not found at {train_tsv.parent}")
            rows = read_sst2(train_tsv)
            random.Random(0).shuffle(rows)
            train, dev = rows[:spec["n_train"]], read_sst2(dev_tsv)
        else:
            path = Path(args.long_file)
            if not path.exists():
                raise Skip(f"long-text file not found: {path}")
            rows = read_jsonl(path)
            n_eval = min(100, len(rows) // 6)
            train, dev = rows[:len(rows) - n_eval], rows[len(rows) - n_eval:]
        train, job["steps"] = capped(train, spec, args.steps)
        job["train_file"] = write_jsonl(wdir / "train.jsonl", train)
        job["eval_file"] = write_jsonl(wdir / "eval.jsonl", dev)
        job["n_train"], job["n_eval"] = len(train), len(dev)
        if spec["model"] == "minilm":
            if not minilm.exists():
                raise Skip(f"model not found: {minilm}")
            job["model_dir"] = str(minilm)
        else:  # DistilBERT-base or tiny architecture, random weights, BERT-uncased vocabulary
            job["model_dir"] = str(save_distilbert(wdir / "model", minilm, train,
                                                   tiny=spec["model"] == "distilbert-tiny"))
        return job

    # Causal LM with LoRA: both sides read the same rows, tokenizer and base weights.
    path = Path(args.alpaca_file)
    if path.exists():
        rows = read_jsonl(path)
        job["data_note"] = f"Alpaca rows from {path.name}"
    elif spec["gpu"]:
        # The device machine has no ../shared: long reviews written as instruction data.
        rows = [{"instruction": "Write a movie review.", "input": "", "output": r["text"]}
                for r in read_jsonl(Path(args.long_file))]
        job["data_note"] = "no Alpaca here: long reviews (core/demo_data) as instruction data"
    else:
        raise Skip(f"Alpaca rows not found: {path}")
    # Rows with an empty answer teach nothing; train_lora refuses them, so both sides drop them.
    rows = [r for r in rows if str(r.get("output") or "").strip()]
    random.Random(0).shuffle(rows)
    n_eval = min(spec.get("n_eval", 200), len(rows) // 10)
    train, dev = rows[:len(rows) - n_eval][:spec.get("n_train")], rows[len(rows) - n_eval:]
    train, job["steps"] = capped(train, spec, args.steps)
    job["train_file"] = write_jsonl(wdir / "train.jsonl", train)
    job["eval_file"] = write_jsonl(wdir / "eval.jsonl", dev)
    job["n_train"], job["n_eval"] = len(train), len(dev)
    total = job["steps"] or math.ceil(len(train) / spec["batch_size"]) * spec["epochs"]
    job["warmup_steps"] = math.ceil(total * WARMUP_RATIO_LM)
    job["model_dir"] = str(pretrained_lm(spec["model"]) if spec["model"] in PRETRAINED_LMS
                           else save_llama(wdir / "model", spec, train, on_gpu))
    return job


def capped(train: list[dict], spec: dict, steps: int) -> tuple[list[dict], int]:
    """Under --steps N, the rows of N optimizer steps, and the step cap both sides get:
    the steps of whole epochs over those rows (N, or a little more where N is not a
    multiple of the epochs; fewer where the workload has fewer rows).

    Every side then trains the same rows, each in its own order. (Capping steps alone
    would not: Trainer's length grouping starts with its longest batch, so its first N
    steps see longer rows than a random draw; and a part epoch, or one past the rows,
    would be a different part for each side.)
    """
    if not steps:
        return train, 0
    rows = train[:math.ceil(steps / spec["epochs"]) * spec["batch_size"]]
    return rows, math.ceil(len(rows) / spec["batch_size"]) * spec["epochs"]


def pretrained_lm(name: str) -> Path:
    """A real model of ../shared, built by its recipe into the cache the tests share."""
    try:
        return built_model(name, SHARED)
    except RecipeMissing as why:
        raise Skip(str(why)) from None
    except RuntimeError as why:  # the recipe is there but fails: the benchmark is broken
        raise PrepareFailed(f"building {name} failed: {why}") from None


def save_llama(out: Path, spec: dict, train: list[dict], on_gpu: bool) -> Path:
    """A Llama from its config, seeded random weights, and a BPE tokenizer trained on the rows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.demo import bpe_tokenizer
    from tasks.instruct import ALPACA_WITH_INPUT
    texts = [ALPACA_WITH_INPUT] + [t for r in train for t in r.values() if isinstance(t, str) and t]
    tokenizer = bpe_tokenizer(texts, vocab_size=BPE_VOCAB, max_length=spec["max_length"])
    shape = LLAMA_SMALL if spec["model"] == "llama-small" else OPENLLAMA_3B
    config = LlamaConfig(**{"vocab_size": len(tokenizer), **shape},
                         max_position_embeddings=max(spec["max_length"], 2048),
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    # Saved in bf16 where a GPU run will load it so (tasks.lora_model.base_dtype).
    dtype = torch.bfloat16 if on_gpu and spec.get("mixed_precision") == "bf16" else torch.float32
    with torch.device("cuda" if on_gpu else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    if on_gpu:
        torch.cuda.empty_cache()  # the children need the memory, not this parent
    return out


def save_distilbert(out: Path, minilm: Path, train: list[dict], tiny: bool = False) -> Path:
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    from core.demo import tiny_distilbert_config
    if minilm.exists():
        tokenizer = AutoTokenizer.from_pretrained(minilm)   # the BERT-uncased vocabulary
    else:
        from core.demo import wordpiece_tokenizer
        tokenizer = wordpiece_tokenizer([r["text"] for r in train], vocab_size=30522,
                                        max_length=512)
    torch.manual_seed(0)
    config = (tiny_distilbert_config(30522, 2, 512) if tiny else
              DistilBertConfig(vocab_size=30522, num_labels=2))
    model = DistilBertForSequenceClassification(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------- the child: one side, one run

class Meter:
    """Counts what the model is fed while training, from a forward pre-hook, and prices
    it in model FLOPs with core.flops.StepFlops, the count rawtune's own log uses.

    Sums stay on the model's device until `totals()`: reading them back in the hook
    would make either side's host wait for its GPU at every forward pass.
    """

    def __init__(self, model, lm: bool):
        from core.flops import StepFlops
        self.step_flops = StepFlops(model)
        self.lm = lm
        self.active = True
        self.sums = dict(examples=0, tokens=0, padded_tokens=0, target_tokens=0, pairs=0)
        self.marks: list[tuple[float, int]] = []  # (host clock, examples before) a forward
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if not (self.active and module.training):
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        lengths = (mask.sum(1) if mask is not None else
                   ids.new_full((ids.shape[0],), ids.shape[1])).double()
        t = self.sums
        self.marks.append((time.perf_counter(), t["examples"]))
        t["examples"] += ids.shape[0]
        t["tokens"] = t["tokens"] + lengths.sum()
        t["pairs"] = t["pairs"] + (lengths * lengths).sum()
        t["padded_tokens"] += ids.numel()
        labels = kwargs.get("labels")
        if self.lm and labels is not None:
            t["target_tokens"] = t["target_tokens"] + (labels[:, 1:] != -100).sum()

    def add_targets(self, n) -> None:
        if self.active:
            self.sums["target_tokens"] = self.sums["target_tokens"] + n

    def totals(self) -> dict:
        t = {k: float(v) for k, v in self.sums.items()}
        t["flops"] = self.step_flops(t["tokens"], t["examples"], t.pop("pairs"))
        return t


class Measure:
    """Wall clock and peak memory of the training call alone.

    Evaluation inside it (rawtune's end-of-run evaluation) is paused out: its time is
    subtracted, and the memory peak is read before it and reset after it. On CPU the
    peak is the RSS high-water mark (VmHWM, reset through /proc/self/clear_refs); on
    CUDA, torch.cuda.max_memory_allocated.
    """

    def __init__(self, model, lm: bool):
        import torch
        self.torch, self.cuda = torch, torch.cuda.is_available()
        self.meter = Meter(model, lm)
        self.paused_s, self.ckpt_s, self.peaks = 0.0, 0.0, []

    def _sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def _reset_peak(self):
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def _read_peak(self):
        self.peaks.append(peak_memory_mb())

    def start(self):
        self._reset_peak()
        self._sync()
        self.t0 = time.perf_counter()

    def stop(self) -> float:
        self._sync()
        self.wall = time.perf_counter() - self.t0 - self.paused_s
        self.meter.active = False
        self._read_peak()
        return self.wall

    def pausing(self, fn):
        """`fn` (an evaluation) run with the clock, the counters and the memory peak paused."""
        def paused(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            self._read_peak()
            self.meter.active = False
            try:
                return fn(*args, **kwargs)
            finally:
                self.meter.active = True
                self._sync()
                self._reset_peak()
                self.paused_s += time.perf_counter() - start
        return paused

    def checkpointing(self, fn):
        """`fn` (a checkpoint save) timed, still inside the clock: reported apart as ckpt_s."""
        def timed(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.ckpt_s += time.perf_counter() - start
        return timed

    def figures(self) -> dict:
        out = {k: max(p.get(k, 0) for p in self.peaks) for k in self.peaks[0]}
        return {**out, "paused_s": self.paused_s, "ckpt_s": self.ckpt_s}


def peak_memory_mb() -> dict:
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["peak_rss_mb"] = int(line.split()[1]) / 1024
    except OSError:
        import resource
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import torch
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def child(spec_path: str) -> int:
    job = json.loads(Path(spec_path).read_text())
    run_fn = {("cls", "rawtune"): rawtune_cls, ("cls", "trainer"): trainer_cls,
              ("lm", "rawtune"): rawtune_lm, ("lm", "trainer"): trainer_lm}
    run_fn = run_fn[job["kind"], "rawtune" if job["side"] == "rawtune" else "trainer"]
    try:
        result = run_fn(job)
    except Skip as why:
        result = {"skipped": str(why)}
    result["process_peak_rss_mb"] = peak_memory_mb()["peak_rss_mb"]
    Path(job["result"]).write_text(json.dumps(result))
    return 0


STEADY_FROM = 5  # training forwards left out of the steady pace: warm-up, compiling


def steady_samples_per_s(marks: list[tuple[float, int]]) -> float | None:
    """Examples per second from the 6th training forward to the last: the pace once
    set-up, the first batch shapes and --compile's compiling are past, before the final
    checkpoint. On a GPU the host clock at each forward runs ahead of the device by at
    most the launches its queue holds, a fraction of a step. None for a short run."""
    if len(marks) < STEADY_FROM + 2:
        return None
    (t0, e0), (t1, e1) = marks[STEADY_FROM], marks[-1]
    return (e1 - e0) / (t1 - t0) if t1 > t0 else None


def _finish(measure: Measure, **figures) -> dict:
    meter, train_s = measure.meter, measure.wall
    t = meter.totals()
    meter.handle.remove()
    out = {"train_s": train_s, **t, **measure.figures(),
           "samples_per_s": t["examples"] / train_s,
           "tokens_per_s": t["tokens"] / train_s,
           "tflops": t["flops"] / train_s / 1e12,
           "padding": 1 - t["tokens"] / max(t["padded_tokens"], 1),
           "samples_per_s_no_ckpt": t["examples"] / max(train_s - measure.ckpt_s, 1e-9),
           "steady_samples_per_s": steady_samples_per_s(meter.marks), **figures}
    if meter.lm:
        out["target_tokens_per_s"] = t["target_tokens"] / train_s
    return out


class StepProfile:
    """torch.profiler over training steps 6 to 8 (the first ones pay for warm-up), once,
    stepped where each step begins (rawtune's at each forward-and-loss call: the
    benchmark runs no gradient accumulation); `finish` writes the operator table and, on
    a GPU, the share of the step the kernels kept the device busy."""

    def __init__(self, path: str):
        import torch
        self.path, self.cuda = Path(path), torch.cuda.is_available()
        acts = [torch.profiler.ProfilerActivity.CPU]
        acts += [torch.profiler.ProfilerActivity.CUDA] if self.cuda else []
        self.prof = torch.profiler.profile(
            activities=acts,
            schedule=torch.profiler.schedule(wait=5, warmup=1, active=3, repeat=1))

    def start(self) -> None:
        self.prof.start()

    def step(self) -> None:
        """A training step begins."""
        self.prof.step()

    def wrap(self, fn):
        def stepped(*args, **kwargs):
            self.step()
            return fn(*args, **kwargs)
        return stepped

    def finish(self) -> None:
        from torch.autograd import DeviceType
        self.prof.stop()
        if self.prof.profiler is None:  # the run ended before step 5's warm-up
            self.path.write_text("nothing profiled: the run ended before step 6\n")
            return
        events = self.prof.key_averages()
        # The host's step ranges (their GPU-side copies are annotations, not work).
        steps = [e for e in events if e.key.startswith("ProfilerStep")
                 and e.device_type == DeviceType.CPU]
        n = sum(e.count for e in steps)
        if not n:
            self.path.write_text("nothing profiled: the run ended before step 6\n")
            return
        wall_us = sum(e.cpu_time_total for e in steps)
        # Device busy time: the kernels themselves, as the table's percentages count them.
        busy_us = sum(e.self_device_time_total for e in events
                      if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
        head = (f"{n} profiled steps, {wall_us / n / 1e3:.1f} ms each on the host clock"
                + (f"; kernels busy {busy_us / n / 1e3:.1f} ms a step "
                   f"({busy_us / max(wall_us, 1):.0%} of it)" if self.cuda else ""))
        key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        self.path.write_text(head + "\n" + events.table(sort_by=key, row_limit=45) + "\n")


def _timed(real_train, measures: list, lm: bool, profile: str | None = None):
    """core.loop.train as the script calls it, timed and metered; one Measure per call.
    With `profile`, its steps 6-8 under torch.profiler, the table written there."""
    import core.checkpoint
    def timed_train(model, task, data, cfg, accelerator, out_dir, *rest, **kwargs):
        measure = Measure(model, lm)
        measures.append(measure)
        if profile:
            prof = StepProfile(profile)
            task.loss_sum = prof.wrap(task.loss_sum)
            prof.start()
        if lm:
            count = task.count

            def counting(batch):
                n = count(batch)
                measure.meter.add_targets(n)
                return n
            task.count = counting
        task.evaluate = measure.pausing(task.evaluate)
        save = core.checkpoint.save
        core.checkpoint.save = measure.checkpointing(save)
        measure.start()
        try:
            result = real_train(model, task, data, cfg, accelerator, out_dir, *rest, **kwargs)
        finally:
            core.checkpoint.save = save
        measure.stop()
        if profile:
            prof.finish()
        return result
    return timed_train


def common_flags(job: dict) -> list[str]:
    argv = ["--train-file", job["train_file"], "--eval-file", job["eval_file"],
            "--model", job["model_dir"], "--max-length", str(job["max_length"]),
            "--lr", str(job["lr"]), "--batch-size", str(job["batch_size"]),
            "--eval-batch-size", str(EVAL_BATCH), "--epochs", str(job["epochs"]),
            "--weight-decay", str(job["weight_decay"]),
            "--warmup-steps", str(job.get("warmup_steps", 0)), "--seed", str(SEED),
            "--output-dir", job["out_dir"], "--overwrite",
            "--mixed-precision", job.get("mixed_precision", "no"),
            # One evaluation, at the end (a sweep's default is ten): the timing leaves
            # evaluation out, but each would still cost the benchmark's wall time.
            "--eval-every", "0"]
    if job["steps"]:
        argv += ["--max-steps", str(job["steps"])]
    return argv + job["extra"]


def rawtune_cls(job: dict) -> dict:
    """train_cls.main with flags, as a user runs it; its core.loop.train call is timed."""
    import core.loop
    import train_cls
    measures = []
    train_cls.train = _timed(core.loop.train, measures, lm=False, profile=job.get("profile"))
    argv = common_flags(job) + ["--text-column", "text", "--label-column", "label"]
    if train_cls.main(argv) != 0:
        raise RuntimeError("train_cls.main failed")
    metrics = json.loads((Path(job["out_dir"]) / "metrics.json").read_text())
    return _finish(measures[0], steps=metrics["steps"], train_loss=metrics["train_loss"],
                   eval_loss=metrics["loss"], accuracy=metrics["accuracy"],
                   own_samples_per_s=metrics["train_samples_per_s"])


def rawtune_lm(job: dict) -> dict:
    """train_lora.main with flags (one rank, r=16); its core.loop.train call is timed."""
    try:
        import train_lora
    except ImportError as err:
        raise Skip(f"train_lora / tasks.instruct not importable ({err})") from None
    import core.loop
    measures = []
    train_lora.train = _timed(core.loop.train, measures, lm=True, profile=job.get("profile"))
    argv = common_flags(job) + [
        "--lora-r", str(LORA["r"]), "--lora-alpha", str(LORA["lora_alpha"]),
        "--lora-dropout", str(LORA["lora_dropout"]), "--target-modules", *LORA["target_modules"]]
    if train_lora.main(argv) != 0:
        raise RuntimeError("train_lora.main failed")
    metrics = json.loads((Path(job["out_dir"]) / f"r{LORA['r']}" / "metrics.json").read_text())
    return _finish(measures[0], steps=metrics["steps"], train_loss=metrics["train_loss"],
                   eval_loss=metrics["eval_loss"],
                   own_samples_per_s=metrics["train_samples_per_s"])


def _value(text: str):
    """A command-line value: JSON where it parses (numbers, true/false, lists), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _trainer_args(job: dict, **kw):
    """Trainer's defaults, with the hyperparameters the rawtune side gets."""
    import torch
    from transformers import TrainingArguments
    extra = {}
    for item in job["extra"]:
        key, value = item.split("=", 1)
        extra[key] = _value(value)
    settings = dict(
        output_dir=job["out_dir"], learning_rate=job["lr"],
        per_device_train_batch_size=job["batch_size"], per_device_eval_batch_size=EVAL_BATCH,
        num_train_epochs=job["epochs"], max_steps=job["steps"] or -1,
        weight_decay=job["weight_decay"], warmup_steps=job.get("warmup_steps", 0),
        max_grad_norm=1.0, seed=SEED, bf16=job.get("mixed_precision") == "bf16",
        use_cpu=not torch.cuda.is_available(),  # Trainer's bf16 on a CPU asks for it
        train_sampling_strategy=("group_by_length" if job["side"] == "trainer-grouped"
                                 else "random"),
        report_to="none", disable_tqdm=True)
    return TrainingArguments(**{**settings, **kw, **extra})  # --trainer-arg wins


def _train_peer(trainer, model, lm: bool, profile: str | None = None):
    """trainer.train() timed and metered; with `profile`, its steps 6-8 profiled as
    rawtune's are (stepped where each optimizer step begins)."""
    from transformers import TrainerCallback
    measure = Measure(model, lm)
    trainer._save_checkpoint = measure.checkpointing(trainer._save_checkpoint)
    if profile:
        prof = StepProfile(profile)

        class Stepping(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                prof.step()
        trainer.add_callback(Stepping())
        prof.start()
    measure.start()
    output = trainer.train()
    measure.stop()
    if profile:
        prof.finish()
    return measure, output


def trainer_cls(job: dict) -> dict:
    """The peer as users set it up: Trainer defaults, DataCollatorWithPadding, same settings."""
    import datasets
    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, Trainer)
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(job["model_dir"], num_labels=2)

    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=job["max_length"])

    train = datasets.Dataset.from_list(read_jsonl(Path(job["train_file"])))
    dev = datasets.Dataset.from_list(read_jsonl(Path(job["eval_file"])))
    train = train.map(encode, batched=True, remove_columns=["text"])
    dev = dev.map(encode, batched=True, remove_columns=["text"])
    trainer = Trainer(model=model, args=_trainer_args(job), train_dataset=train,
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    measure, output = _train_peer(trainer, model, lm=False, profile=job.get("profile"))
    pred = trainer.predict(dev)
    logits = torch.tensor(pred.predictions).float()
    labels = torch.tensor(pred.label_ids)
    return _finish(measure, steps=output.global_step, train_loss=output.training_loss,
                   eval_loss=float(torch.nn.functional.cross_entropy(logits, labels)),
                   accuracy=float(np.mean(logits.argmax(-1).numpy() == labels.numpy())),
                   own_samples_per_s=output.metrics["train_samples_per_second"])


def trainer_lm(job: dict) -> dict:
    """The peer: Trainer + peft get_peft_model, DataCollatorForSeq2Seq padding labels with -100.

    Rows are rendered and tokenised with tasks.instruct (Alpaca template, prompt masked),
    so both sides train on identical ids; the base loads in the dtype train_lora picks.
    """
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq,
                              Trainer)
    from transformers.trainer_utils import set_seed

    from eval.lm import evaluate_lm
    from tasks.instruct import encode, prompt_template
    from tasks.lora_model import base_dtype

    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    template = prompt_template("alpaca")

    def rows(path: str, where: str) -> list[dict]:
        examples = [{"instruction": r.get("instruction") or "", "input": r.get("input") or "",
                     "output": r["output"]} for r in read_jsonl(Path(path))]
        return encode(examples, template, tokenizer, job["max_length"], where).rows

    train_rows, eval_rows = rows(job["train_file"], "train"), rows(job["eval_file"], "eval")
    # The frozen base in the dtype train_lora.py gives it (bf16 in a bf16 run).
    dtype = base_dtype(torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                       job.get("mixed_precision", "no"))
    set_seed(SEED)
    base = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=dtype)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **LORA))
    train = datasets.Dataset.from_list(
        [{**r, "attention_mask": [1] * len(r["input_ids"])} for r in train_rows])
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=_trainer_args(job), train_dataset=train,
                      data_collator=collator, processing_class=tokenizer)
    measure, output = _train_peer(trainer, model, lm=True, profile=job.get("profile"))
    model.eval()
    from core.collate import pad_batch
    scores = evaluate_lm(model, eval_rows, lambda b: pad_batch(b, tokenizer.pad_token_id),
                         EVAL_BATCH, trainer.accelerator)
    return _finish(measure, steps=output.global_step, train_loss=output.training_loss,
                   eval_loss=scores["loss"],
                   own_samples_per_s=output.metrics["train_samples_per_second"])


# ---------------------------------------------------------------- the parent: alternate, report

def run_side(job: dict, side: str, extra: list[str], work: Path, tag: str) -> dict:
    spec = {**job, "side": side, "extra": extra, "out_dir": str(work / f"{tag}-out"),
            "result": str(work / f"{tag}-result.json")}
    spec_path = work / f"{tag}-spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = work / f"{tag}.log"
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, "-m", "bench.run", "--child", str(spec_path)],
                              cwd=ROOT, env={**os.environ, **ENV}, stdout=log,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not Path(spec["result"]).exists():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        return {"error": f"exit {proc.returncode}", "log_tail": tail}
    result = json.loads(Path(spec["result"]).read_text())
    result["process_s"] = time.perf_counter() - start
    return result


def summarise(runs: dict[str, list[dict]], on_gpu: bool, peak_tflops: float | None) -> dict:
    summary = {}
    for side, results in runs.items():
        ok = [r for r in results if "samples_per_s" in r]
        if not ok:
            continue
        med = {k: statistics.median(r[k] for r in ok) for k in
               ("samples_per_s", "tokens_per_s", "tflops", "train_s", "ckpt_s",
                "samples_per_s_no_ckpt")}
        if "target_tokens_per_s" in ok[0]:
            med["target_tokens_per_s"] = statistics.median(r["target_tokens_per_s"] for r in ok)
        steady = [r["steady_samples_per_s"] for r in ok if r.get("steady_samples_per_s")]
        med["steady_samples_per_s"] = statistics.median(steady) if steady else None
        last = ok[-1]
        summary[side] = {**med, "n": len(ok),
                         "samples_per_s_all": [round(r["samples_per_s"], 2) for r in ok],
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
                         "cuda_peak_mb": max((r.get("cuda_peak_mb", 0) for r in ok), default=0),
                         "steps": last["steps"], "examples": last["examples"],
                         "train_loss": last["train_loss"], "eval_loss": last["eval_loss"],
                         "accuracy": last.get("accuracy"), "padding": last["padding"],
                         "own_samples_per_s": statistics.median(r["own_samples_per_s"]
                                                                for r in ok)}
        if peak_tflops:
            summary[side]["mfu"] = med["tflops"] / peak_tflops
    peers = [p for p in PEERS if p in summary]
    if "rawtune" in summary and peers:
        # Against the faster peer: the ratio a user who tunes Trainer would see.
        speed = _speed_key(summary["rawtune"])
        best = max(peers, key=lambda p: summary[p][speed])
        summary["ratio"] = {"vs": best, "measure": speed, **_ratio(summary, runs, best, on_gpu),
                            "vs_each": {p: _ratio(summary, runs, p, on_gpu)["speed"]
                                        for p in peers}}
    return summary


def _speed_key(side: dict) -> str:
    """The headline measure: tokens trained per second — target tokens for a language
    model, the tokens its loss is taken on."""
    return "target_tokens_per_s" if "target_tokens_per_s" in side else "tokens_per_s"


def _ratio(summary: dict, runs: dict, peer: str, on_gpu: bool) -> dict:
    """rawtune over `peer`: medians, each alternated pair, peak memory."""
    r, t = summary["rawtune"], summary[peer]
    key = _speed_key(r)
    pairs = [a[key] / b[key] for a, b in zip(runs["rawtune"], runs[peer]) if key in a and key in b]
    mem = "cuda_peak_mb" if on_gpu else "peak_rss_mb"
    steady = (r["steady_samples_per_s"] / t["steady_samples_per_s"]
              if r.get("steady_samples_per_s") and t.get("steady_samples_per_s") else None)
    return {"speed": r[key] / t[key], "samples_per_s": r["samples_per_s"] / t["samples_per_s"],
            "samples_per_s_no_ckpt": r["samples_per_s_no_ckpt"] / t["samples_per_s_no_ckpt"],
            "steady": steady, "per_pair": [round(p, 3) for p in pairs],
            "peak_memory": r[mem] / t[mem]}


def _ratio_lines(name: str, ratio: dict) -> tuple[str, str]:
    """The workload's ratio row (the headline under tokens/s or target tok/s) and its note."""
    tokens, targets = ("", f"**{ratio['speed']:.2f}×**") if ratio["measure"] != "tokens_per_s" \
        else (f"**{ratio['speed']:.2f}×**", "")
    row = (f"| **{name}** | **rawtune / best Trainer ({SIDE_NAMES[ratio['vs']]})** | "
           f"{ratio['samples_per_s']:.2f}× | {tokens} | {targets} | | | "
           f"{ratio['peak_memory']:.2f}× | | | | | | | {ratio['samples_per_s_no_ckpt']:.2f}× |")
    note = (f"- {name}: rawtune / best Trainer {ratio['measure'].replace('_', ' ')} per "
            f"alternated pair {ratio['per_pair']}; against each peer: "
            + ", ".join(f"{SIDE_NAMES[p]} {v:.2f}×" for p, v in ratio["vs_each"].items()))
    if ratio.get("steady"):
        note += (f"; samples/s at a steady pace (training forwards {STEADY_FROM + 1} to the "
                 f"last: no set-up, compiling or final checkpoint) {ratio['steady']:.2f}×")
    return row, note


def fmt(value, spec=".1f", none="–"):
    return none if value is None else format(value, spec)


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"# rawtune vs HF Trainer — {meta['date']}", "",
             f"- machine: {meta['machine']}", f"- command: `{meta['command']}`",
             f"- torch {meta['torch']}, transformers {meta['transformers']}, "
             f"peft {meta['peft']}, accelerate {meta['accelerate']}",
             f"- repeats: {meta['repeats']} (sides alternated); steps cap: "
             f"{meta['steps'] or 'none (full epochs)'}", ""]
    if meta.get("note"):
        lines += [f"**{meta['note']}**", ""]
    lines += ["Samples/s and tokens/s: median over repeats of examples (tokens) trained / "
              "wall time of the training call. Peak memory: "
              + ("`torch.cuda.max_memory_allocated` during the training call." if meta["cuda"]
                 else "the RSS high-water mark (VmHWM) during the training call, each side in "
                      "its own fresh process.")
              + " Padding: share of the batch's positions that are padding. Both sides save a "
              "checkpoint at the end (rawtune's loop always does; Trainer's default "
              "save_strategy='steps' does); its time is shown apart."
              + (" MFU: against the measured peak of a dense matrix product on this CPU in "
                 "the run's precision (bench/peak.py): " + ", ".join(
                     f"{k if k != 'no' else 'fp32'} {v * 1000:.0f} GFLOP/s"
                     for k, v in meta["peak_tflops"].items()) + "."
                 if not meta["cuda"] else ""), "",
              "| workload | side | samples/s | tokens/s | target tok/s | TFLOP/s | MFU | "
              "peak mem MiB | train loss | eval loss | accuracy | padding | steps | "
              "checkpoint s | samples/s excl. checkpoint |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, w in results["workloads"].items():
        if "skipped" in w or "error" in w:
            why = f"skipped: {w['skipped']}" if "skipped" in w else f"FAILED: {w['error']}"
            lines.append(f"| {name} | {why} | | | | | | | | | | | | | |")
            continue
        s = w["summary"]
        for side in w["runs"]:
            if side not in s:
                why = next((r.get("skipped") or r.get("error") for r in w["runs"][side]), "?")
                lines.append(f"| {name} | {SIDE_NAMES[side]}: {why} | | | | | | | | | | | | | |")
                continue
            x = s[side]
            mem = x["cuda_peak_mb"] if results["meta"]["cuda"] else x["peak_rss_mb"]
            lines.append(
                f"| {name} | {SIDE_NAMES[side]} | {x['samples_per_s']:.2f} | "
                f"{x['tokens_per_s']:.0f} | {fmt(x.get('target_tokens_per_s'), '.0f')} | "
                f"{x['tflops']:.3f} | {fmt(x.get('mfu'), '.1%')} | {mem:.0f} | "
                f"{x['train_loss']:.4f} | {x['eval_loss']:.4f} | {fmt(x['accuracy'], '.4f')} | "
                f"{x['padding']:.1%} | {x['steps']} | {x['ckpt_s']:.1f} | "
                f"{x['samples_per_s_no_ckpt']:.2f} |")
        if "ratio" in s:
            row, note = _ratio_lines(name, s["ratio"])
            lines.append(row)
            notes.append(note)
        steady = {side: s[side].get("steady_samples_per_s") for side in w["runs"] if side in s}
        if any(steady.values()):
            notes.append(f"- {name}: samples/s at a steady pace (training forwards "
                         f"{STEADY_FROM + 1} to the last): " + ", ".join(
                             f"{SIDE_NAMES[side]} {fmt(v, '.2f')}" for side, v in steady.items()))
        if w.get("data_note"):
            notes.append(f"- {name}: {w['data_note']}")
    return "\n".join(lines + [""] + notes) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS),
                        choices=list(WORKLOADS), help="which workloads (default: all)")
    parser.add_argument("--steps", type=int, default=0,
                        help="train the rows of N optimizer steps on every side, for whole "
                             "epochs (default: every row)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternated")
    parser.add_argument("--out", default=str(ROOT / "bench"),
                        help="folder for results.md and results.json")
    parser.add_argument("--long-file", default=str(DEMO_DATA / "sentiment_long.jsonl"),
                        help="jsonl of {text, label} long texts for cls-long / gpu-distilbert")
    parser.add_argument("--alpaca-file", default=str(SHARED / "data/alpaca_5k/alpaca_5000.jsonl"))
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="GPU peak for MFU (H100/H200 SXM bf16 dense: 989); on a CPU the "
                             "peak is measured (bench/peak.py)")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"],
                        help="override every workload's precision on both sides (default: "
                             "each workload's own: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--batch-size", type=int,
                        help="override every workload's batch size on both sides (default: "
                             "each workload's own)")
    parser.add_argument("--rawtune-arg", action="append", default=[],
                        help="extra train_cls flag for rawtune's side (cls: e.g. "
                             "--rawtune-arg=--no-group-by-length; lm: group_by_length=false)")
    parser.add_argument("--trainer-arg", action="append", default=[],
                        help="extra TrainingArguments KEY=VALUE for both peer runs, e.g. "
                             "dataloader_num_workers=1")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES),
                        help="which sides run (default: all three; the ratio needs rawtune "
                             "and a Trainer side)")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed runs, one more run of each side with steps 6-8 "
                             "under torch.profiler; tables in OUT/profile-NAME-SIDE.txt")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    parser.add_argument("--note", default="", help="a line written at the top of results.md")
    args = parser.parse_args(argv)
    args.sides = list(dict.fromkeys(args.sides))  # each once, in the order given
    return args


def meta(args, argv: list[str] | None, on_gpu: bool, cpu_peaks: dict) -> dict:
    """What a result is only comparable with: machine, date, versions, settings."""
    import accelerate
    import peft
    import torch
    import transformers
    machine = (f"{torch.cuda.get_device_name(0)}" if on_gpu else
               f"CPU, {os.cpu_count()} cores, "
               f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
    return {"date": datetime.date.today().isoformat(), "machine": machine, "cuda": on_gpu,
            "host": platform.node(), "command": "python -m bench " + " ".join(argv or sys.argv[1:]),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__,
            "repeats": args.repeats, "steps": args.steps,
            "peak_tflops": args.peak_tflops if on_gpu else cpu_peaks, "note": args.note}


def run_workload(name: str, job: dict, args, work: Path, on_gpu: bool, peak: float) -> dict:
    """Every side, `--repeats` times, alternated; the runs, their summary and ratios."""
    runs = {side: [] for side in args.sides}
    extras = side_args(args)
    for rep in range(args.repeats):
        for side in args.sides:
            result = run_side(job, side, extras[side], work / name, f"{side}-{rep}")
            runs[side].append(result)
            print(f"[{name}] {side} #{rep + 1}: " + (
                f"{result['samples_per_s']:.2f} samples/s, {result['tokens_per_s']:.0f} "
                f"tokens/s, {result['steps']} steps in {result['train_s']:.1f}s, "
                f"loss {result['train_loss']:.4f}, peak RSS {result['peak_rss_mb']:.0f} MiB"
                if "samples_per_s" in result else
                f"skipped: {result['skipped']}" if "skipped" in result else
                f"FAILED {result['error']}\n  " + "\n  ".join(result["log_tail"])), flush=True)
    if args.profile:
        profile(name, job, args, work)
    summary = summarise(runs, on_gpu, peak)
    if "ratio" in summary:
        ratio = summary["ratio"]
        print(f"[{name}] rawtune / best Trainer ({ratio['vs']}) "
              f"{ratio['measure'].replace('_', ' ')} {ratio['speed']:.2f}x "
              f"(pairs {ratio['per_pair']}), peak memory {ratio['peak_memory']:.2f}x", flush=True)
    settings = {k: job[k] for k in ("model", "lr", "batch_size", "epochs", "max_length",
                                    "weight_decay", "n_train", "n_eval", "steps") if k in job}
    settings |= {"mixed_precision": job.get("mixed_precision", "no"),
                 "rawtune_args": args.rawtune_arg, "trainer_args": args.trainer_arg}
    return {"settings": settings, "data_note": job.get("data_note"), "runs": runs,
            "summary": summary}


def side_args(args) -> dict[str, list[str]]:
    """Each side's extra arguments: rawtune's flags, or both peers' TrainingArguments."""
    return {"rawtune": args.rawtune_arg, "trainer": args.trainer_arg,
            "trainer-grouped": args.trainer_arg}


def profile(name: str, job: dict, args, work: Path) -> None:
    """One more run of each side, outside the figures, with steps 6 to 8 under
    torch.profiler: their operator tables go to OUT/profile-NAME-SIDE.txt."""
    extras = side_args(args)
    for side in args.sides:
        table = Path(args.out) / f"profile-{name}-{side}.txt"
        table.parent.mkdir(parents=True, exist_ok=True)
        table.unlink(missing_ok=True)  # an earlier run's table would pass for this one's
        result = run_side({**job, "profile": str(table)}, side, extras[side], work / name,
                          f"{side}-profile")
        print(f"[{name}] {side} profile: " + (str(table) if "error" not in result else
                                              f"FAILED {result['error']}"), flush=True)


def report(results: dict, out: Path) -> int:
    """results.json and results.md written and printed; 1 if anything failed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (out / "results.md").write_text(table)
    print(table)
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    failed = [name for name, w in results["workloads"].items() if "error" in w]
    failed += [f"{name} {side}" for name, w in results["workloads"].items()
               for side, runs in w.get("runs", {}).items() if any("error" in r for r in runs)]
    if failed:  # a side that crashed is a broken benchmark, not a slow side
        print(f"FAILED: {', '.join(failed)} (see the log above)", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args.child)
    import torch

    from bench import peak as bench_peak
    on_gpu = torch.cuda.is_available()
    # A CPU's peak is measured in the precisions the run uses, before any workload loads
    # the machine.
    precisions = {args.mixed_precision or WORKLOADS[name].get("mixed_precision", "no")
                  for name in args.workloads if not WORKLOADS[name]["gpu"]}
    cpu_peaks = {} if on_gpu else bench_peak.cpu_peaks(sorted(precisions))
    results = {"meta": meta(args, argv, on_gpu, cpu_peaks), "workloads": {}}
    work = Path(tempfile.mkdtemp(prefix="rawtune-bench-"))
    try:
        for name in args.workloads:
            try:
                job = prepare(name, WORKLOADS[name], args, work, on_gpu)
            except (Skip, PrepareFailed) as why:
                skipped = isinstance(why, Skip)
                print(f"[{name}] {'skipped' if skipped else 'FAILED'}: {why}", flush=True)
                results["workloads"][name] = {"skipped" if skipped else "error": str(why)}
                continue
            peak = args.peak_tflops if on_gpu else cpu_peaks[job.get("mixed_precision", "no")]
            results["workloads"][name] = run_workload(name, job, args, work, on_gpu, peak)
    finally:
        if args.keep_work:
            print(f"scratch kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return report(results, Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
