"""The CUDA paths of several processes and --fsdp, on real architectures with random weights.

    python -m bench.gpu_scaling --out bench/scaling          # on a machine with a GPU

No hub is needed: OpenLLaMA-3b's architecture (hidden 3200, 26 layers, 32 heads,
intermediate 8640) and DistilBERT-base are built from their configs with seeded random
weights, with a BPE / WordPiece tokenizer trained on the shipped rows. Each case runs a
script under `torchrun --nproc_per_node N` (nccl), so the process group, DDP or FSDP2,
bf16 and the sharded checkpoint all take their CUDA paths; `--steps` optimizer steps each.
The figures (tokens/s, peak CUDA memory, weights + optimizer state per device) come from
the runs' own train_log.jsonl and metrics.json and go to OUT/scaling.md and scaling.json.
"""

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

from bench.run import DEMO_DATA, ROOT, read_jsonl, save_distilbert, save_llama, write_jsonl

QA = DEMO_DATA / "qa.jsonl"
REVIEWS = DEMO_DATA / "sentiment_long.jsonl"
# (name, script, model, extra flags): full fine-tuning of a 3B classifier needs --fsdp
# across GPUs, or 55 GB of state on one; LoRA holds a bf16 base and small adapters.
CASES = [
    ("cls DistilBERT-base, DDP", "train_cls.py", "distilbert", []),
    ("cls DistilBERT-base, --fsdp", "train_cls.py", "distilbert", ["--fsdp"]),
    ("LoRA r 8 OpenLLaMA-3b, DDP", "train_lora.py", "openllama", ["--gradient-checkpointing"]),
    ("LoRA r 8 OpenLLaMA-3b, --fsdp", "train_lora.py", "openllama",
     ["--fsdp", "--gradient-checkpointing"]),
    ("full FT OpenLLaMA-3b classifier, --fsdp", "train_cls.py", "openllama",
     ["--fsdp", "--batch-size", "4"]),
]


def build_models(work: Path) -> dict[str, Path]:
    rows = read_jsonl(QA)
    spec = dict(model="openllama-3b", max_length=512, mixed_precision="bf16")
    return {"openllama": save_llama(work / "openllama-3b", spec, rows, on_gpu=True),
            "distilbert": save_distilbert(work / "distilbert-base", Path("/nonexistent"),
                                          read_jsonl(REVIEWS))}


def flags(script: str, model: Path, work: Path, steps: int) -> list[str]:
    common = ["--model", str(model), "--max-steps", str(steps), "--mixed-precision", "bf16",
              "--max-length", "512", "--log-every", "10"]
    if script == "train_lora.py":
        return common + ["--train-file", str(QA), "--lora-r", "8", "--batch-size", "8"]
    rows = read_jsonl(REVIEWS)
    return common + ["--train-file", write_jsonl(work / "train.jsonl", rows[:-100]),
                     "--eval-file", write_jsonl(work / "eval.jsonl", rows[-100:]),
                     "--batch-size", "16"]


def figures(out: Path, lora: bool) -> dict:
    run = out / "r8" if lora else out
    steps = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["type"] == "train"][1:]  # the first step pays warm-up costs
    metrics = json.loads((run / "metrics.json").read_text())
    return {"tokens_per_s": sum(s["tokens_per_s"] for s in steps) / len(steps),
            "peak_cuda_mib": max(s.get("peak_mem_mib", 0) for s in steps),
            "state_mib_per_device": metrics["state_mib_per_device"],
            "mfu": sum(s.get("mfu", 0) for s in steps) / len(steps)}


def main(argv: list[str] | None = None) -> int:
    import torch
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/scaling")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device — run this on a GPU machine", file=sys.stderr)
        return 2
    out = Path(args.out)
    models = build_models(out / "models")
    results = []
    for i, (name, script, model, extra) in enumerate(CASES):
        run_dir = out / "runs" / f"case{i}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", str(ROOT / script),
               *flags(script, models[model], out, args.steps), *extra,
               "--output-dir", str(run_dir), "--overwrite"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        row = {"case": name, "returncode": proc.returncode}
        if proc.returncode == 0:
            row.update(figures(run_dir, script == "train_lora.py"))
        else:
            row["error"] = proc.stderr[-2000:]
        print(json.dumps(row), flush=True)
        results.append(row)
    machine = f"{torch.cuda.get_device_name(0)} × {args.nproc}, torch {torch.__version__}"
    report = {"date": datetime.date.today().isoformat(), "machine": machine, "rows": results}
    (out / "scaling.json").write_text(json.dumps(report, indent=2))
    lines = [f"{report['date']}, {machine}, {args.steps} steps, bf16, max length 512", "",
             "| case | tokens/s | peak CUDA MiB | weights + AdamW MiB/device | MFU |",
             "|---|---|---|---|---|"]
    for r in results:
        if r["returncode"]:
            lines.append(f"| {r['case']} | failed (exit {r['returncode']}) | | | |")
        else:
            lines.append(f"| {r['case']} | {r['tokens_per_s']:,.0f} | {r['peak_cuda_mib']:,.0f} "
                         f"| {r['state_mib_per_device']:,.0f} | {100 * r['mfu']:.1f} % |")
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
