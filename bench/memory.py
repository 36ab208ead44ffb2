"""Memory of one LoRA training configuration under each base precision, split by what holds it.

    python -m bench.memory                           # CPU: a Llama of hidden 1024, 8 layers
    python -m bench.memory --arch openllama-3b --bases fp16 bf16 4bit \\
        --batch-size 8 --max-length 512 --checkpointing off   # on a GPU

Each configuration (base precision x gradient checkpointing) trains `--steps` optimizer
steps of `train_lora.py`'s model and loop (`tasks.lora_model.build_lora_model`,
`core.loop.train`) in a fresh subprocess, since a process's peak memory is its own. The
model is built from its config with seeded random weights and saved once; rows are
random token ids of exactly `--max-length` tokens (the first quarter a prompt, label -100),
so every batch has the same shape and no padding.

What is measured, per configuration:
- peak: on CPU the RSS high-water mark (VmHWM), reset through /proc/self/clear_refs once
  the model is built; on CUDA `torch.cuda.max_memory_allocated`, reset likewise;
- baseline: what the process holds before the model is built, after one training step
  of a tiny model of the same kind, so that the libraries' one-off costs (imports,
  thread pools, kernel caches) are in it (on CPU its RSS, about 0.6 GiB; on CUDA ~0);
- base weights: the bytes of the frozen base's weights, buffers and quantisation scales,
  counted from their storage (`tasks.quantize.weight_bytes`);
- trainable state: the LoRA weights (counted likewise), their gradients (one fp32 tensor
  of each weight's size, all alive at the end of the backward pass) and AdamW's state,
  counted from the optimizer's tensors;
- load residue: what the process holds once the model is built beyond the baseline and
  the base's weights. On CPU, transformers reads the checkpoint through a memory map.
  An fp32 base is that mapped file, paged in as it is used: no residue. After a
  quantised base is built, the process's file-backed RSS (RssFile) stays higher by
  about the checkpoint's size: the pages quantisation read remain mapped (clean, so the
  OS may drop them, yet RSS counts them);
- activations and the rest: peak - baseline - base - trainable state - load residue:
  what the forward pass keeps for the backward pass, the logits and the loss,
  dequantised weights in flight, and (on CPU) allocator slack;
- tokens/s: the median over the steps after the first (which pays one-off costs), from
  the run's own train_log.jsonl.
Each row also has the estimate of `bench.fits` (the README's "What fits where").
Writes OUT/memory.md and OUT/memory.json.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.run import ENV, OPENLLAMA_3B, ROOT

ARCHS = {
    # Large enough that the base outweighs the LoRA state and (with checkpointing) the
    # activations; the vocabulary is cut to 8,192 so that, as in a 3B model, the
    # embeddings and output layer are a small share of the base.
    "llama-1024x8": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=8192),
    "openllama-3b": OPENLLAMA_3B,
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=512),
}
# base precision -> (--mixed-precision, quantisation flag); the base's dtype follows from
# them as in train_lora.py (tasks.lora_model.base_dtype, then the quantised load)
BASES = {"fp32": ("no", None), "bf16": ("bf16", None), "fp16": ("fp16", None),
         "8bit": ("bf16", "load_in_8bit"), "4bit": ("bf16", "load_in_4bit")}


def save_model(arch: str, out: Path, on_gpu: bool) -> Path:
    """The architecture with seeded random weights, saved (bf16 on a GPU, to save time)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**ARCHS[arch], max_position_embeddings=2048, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda" if on_gpu else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if on_gpu else torch.float32)
    model.save_pretrained(out)
    del model
    return out


def rows(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    import torch
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length // 4) + ids[length // 4:]})
    return out


def process_memory(key: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


class Peak:
    """Peak memory since `reset()`: RSS on CPU, allocated CUDA memory on a GPU."""

    def __init__(self, device):
        import torch
        self.torch, self.cuda = torch, device.type == "cuda"

    def now(self) -> float:
        return self.torch.cuda.memory_allocated() if self.cuda else process_memory("VmRSS")

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def read(self) -> float:
        return self.torch.cuda.max_memory_allocated() if self.cuda else process_memory("VmHWM")


def train_one(job: dict, model_dir: str, out_dir: Path, shape: tuple[int, int, int, int],
              on_loaded) -> tuple:
    """Train LoRA on `model_dir` as job says, with (batch, length, steps, vocab) = `shape`;
    `on_loaded()` runs once the model is built. Returns (model, optimizer)."""
    import core.loop
    from core.parallel import make_accelerator
    from tasks.instruct import CausalLMTask
    from tasks.lora_config import LoraRunConfig
    from tasks.lora_model import base_dtype, build_lora_model

    batch, length, steps, vocab = shape
    precision, flag = BASES[job["base"]]
    cfg = LoraRunConfig(model=model_dir, lora_r=[job["r"]], batch_size=batch, max_length=length,
                        mixed_precision=precision, gradient_checkpointing=job["checkpointing"],
                        max_steps=steps, log_every=1, warmup_ratio=0.0, group_by_length=False,
                        output_dir=str(out_dir), **({flag: True} if flag else {}))
    accelerator = make_accelerator(precision)
    model = build_lora_model(model_dir, job["r"], cfg,
                             base_dtype(accelerator.device, precision),
                             accelerator.device).to(accelerator.device)
    optimizers, real_adamw = [], core.loop.build_adamw

    def catching_adamw(*args, **kwargs):  # the loop's optimizer, to count its state
        optimizers.append(real_adamw(*args, **kwargs))
        return optimizers[-1]
    task = CausalLMTask(rows(1, 16, vocab, 1), 0, 1, accelerator, 1)
    train_rows = rows(batch * steps, length, vocab, 0)
    data = core.loop.TrainData(train_rows, task.collate, [length] * len(train_rows))
    out_dir.mkdir(parents=True)
    on_loaded()
    core.loop.build_adamw = catching_adamw
    try:
        core.loop.train(model, task, data, cfg, accelerator, out_dir)
    finally:
        core.loop.build_adamw = real_adamw
    return model, optimizers[0]


def measure(job: dict) -> dict:
    """One configuration in this process: the memory split and tokens/s (see the docstring)."""
    import gc

    import torch

    from core import host_memory
    from tasks.quantize import weight_bytes

    # As the loop does for LoRA (--cpu-memory auto is `return` there), from the start:
    # loading's slack goes back.
    host_memory.map_large_blocks()
    # One step of a tiny model of the same kind first, so that the libraries' one-off
    # costs (lazy imports, thread pools, kernel caches) fall into the baseline.
    train_one(job, job["tiny_dir"], Path(job["out_dir"]) / "warm-up", (1, 16, 1, 512),
              lambda: None)
    gc.collect()
    peak = Peak(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    baseline = peak.now()
    out_dir = Path(job["out_dir"]) / "run"
    shape = (job["batch_size"], job["max_length"], job["steps"], job["vocab"])
    loaded = []

    def on_loaded():  # what the built model leaves in the process; the peak counts from here
        loaded.append(peak.now())
        peak.reset()
    model, optimizer = train_one(job, job["model_dir"], out_dir, shape, on_loaded)
    top = peak.read()
    base, lora = weight_bytes(model), weight_bytes(model, trainable=True)
    residue = max(0.0, loaded[0] - baseline - base - lora)  # the LoRA weights count below
    adam = sum(t.numel() * t.element_size() for s in optimizer.state.values()
               for t in s.values() if isinstance(t, torch.Tensor))
    trainable = 2 * lora + adam  # weights, their gradients, AdamW's moments
    log = [json.loads(line) for line in (out_dir / "train_log.jsonl").open()]
    speeds = [r["tokens_per_s"] for r in log if r["type"] == "train"][1:]
    return {"peak_mib": top / 2**20, "baseline_mib": baseline / 2**20,
            "base_mib": base / 2**20, "trainable_mib": trainable / 2**20,
            "load_residue_mib": residue / 2**20,
            "activations_mib": (top - baseline - base - trainable - residue) / 2**20,
            "tokens_per_s": statistics.median(speeds),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run_child(job: dict, work: Path) -> dict:
    """`measure(job)` in a fresh process; its result, or the error's last lines."""
    spec, result = work / f"{job['name']}.json", work / f"{job['name']}.result.json"
    spec.write_text(json.dumps({**job, "result": str(result)}))
    proc = subprocess.run([sys.executable, "-m", "bench.memory", "--child", str(spec)],
                          cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True)
    if proc.returncode or not result.exists():  # a child killed for memory says nothing
        return {"error": [f"exit {proc.returncode}", *proc.stderr.strip().splitlines()[-5:]]}
    return json.loads(result.read_text())


def child(spec_path: str) -> int:
    job = json.loads(Path(spec_path).read_text())
    Path(job["result"]).write_text(json.dumps(measure(job)))
    return 0


def configurations(args, on_gpu: bool) -> list[tuple[str, bool]]:
    """(base, checkpointing) pairs to run; fp16 needs a GPU (a CPU has no fp16 autocast
    with a gradient scaler), so it is left out on a CPU with a line saying so."""
    bases = [b for b in args.bases if on_gpu or b != "fp16"]
    if len(bases) < len(args.bases):
        print("fp16 skipped: a CPU has no fp16 autocast with a gradient scaler", flush=True)
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    return [(base, ckpt) for base in bases for ckpt in checkpointing]


def machine(on_gpu: bool) -> str:
    import torch
    if on_gpu:
        return torch.cuda.get_device_name(0)
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "CPU")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB"


def markdown(results: dict) -> str:
    """The table, each part beside bench.fits' estimate of it (in brackets)."""
    from bench import fits
    meta = results["meta"]
    arch = ARCHS[meta["arch"]]
    shape = dict(h=arch["hidden_size"], m=arch["intermediate_size"],
                 L=arch["num_hidden_layers"], V=arch["vocab_size"])
    memory = "peak CUDA memory allocated" if meta["cuda"] else "peak RSS"
    lines = [f"# LoRA memory by base precision — {meta['date']}", "",
             f"- machine: {meta['machine']}", f"- command: `{meta['command']}`",
             f"- {meta['arch']}, LoRA r {meta['r']} on all 7 projections, batch "
             f"{meta['batch_size']} x {meta['max_length']} tokens, {meta['steps']} steps; "
             f"torch {meta['torch']}", "",
             f"MiB. Peak: {memory} of the training process; in brackets, the estimate of "
             "bench/fits.py. See bench/memory.py for how each part is measured.", "",
             "| base | checkpointing | peak | baseline | base weights | trainable state | "
             "load residue | activations & rest | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        head = f"| {run['base']} | {'on' if run['checkpointing'] else 'off'} |"
        if "error" in run:
            lines.append(head + " failed: " + " / ".join(run["error"])[-200:] + " |||||||")
            continue
        guess = {k: v / 2**20 for k, v in fits.estimate(
            shape, run["base"], meta["r"], meta["batch_size"] * meta["max_length"],
            run["checkpointing"]).items()}
        lines.append(head + f" {run['peak_mib']:,.0f} | {run['baseline_mib']:,.0f} | "
                     f"{run['base_mib']:,.0f} ({guess['base']:,.0f}) | "
                     f"{run['trainable_mib']:,.0f} ({guess['lora']:,.0f}) | "
                     f"{run['load_residue_mib']:,.0f} | {run['activations_mib']:,.0f} "
                     f"({guess['activations']:,.0f}) | {run['tokens_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--arch", default="llama-1024x8", choices=list(ARCHS))
    parser.add_argument("--bases", nargs="+", default=["fp32", "bf16", "8bit", "4bit"],
                        choices=list(BASES), help="base precisions (fp16 only on a GPU)")
    parser.add_argument("--checkpointing", default="both", choices=["off", "on", "both"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (all 7 projections)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (2 or more)")
    parser.add_argument("--out", default=str(ROOT / "bench"),
                        help="folder for memory.md and memory.json")
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child)
    if args.steps < 2:
        parser.error("--steps must be 2 or more: the first step is left out of tokens/s")

    import torch
    on_gpu = torch.cuda.is_available()
    results = {"meta": {"date": datetime.date.today().isoformat(), "machine": machine(on_gpu),
                        "cuda": on_gpu,
                        "command": "python -m bench.memory " + " ".join(argv or sys.argv[1:]),
                        "torch": torch.__version__, **vars(args)}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="rawtune-memory-") as tmp:
        work = Path(tmp)
        model_dir = save_model(args.arch, work / "model", on_gpu)
        tiny_dir = save_model("tiny", work / "tiny", on_gpu)  # for each child's warm-up step
        for base, ckpt in configurations(args, on_gpu):
            name = f"{base}-{'ckpt' if ckpt else 'no-ckpt'}"
            job = {"name": name, "base": base, "checkpointing": ckpt, "model_dir": str(model_dir),
                   "tiny_dir": str(tiny_dir),
                   "out_dir": str(work / name), "r": args.r, "batch_size": args.batch_size,
                   "max_length": args.max_length, "steps": args.steps,
                   "vocab": ARCHS[args.arch]["vocab_size"]}
            result = {"base": base, "checkpointing": ckpt, **run_child(job, work)}
            results["runs"].append(result)
            print(json.dumps(result), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(results, indent=1))
    (out / "memory.md").write_text(markdown(results))
    print(markdown(results))
    return 1 if any("error" in run for run in results["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
