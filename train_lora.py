"""LoRA instruction tuning of a causal LM (default: OpenLLaMA 3B v2 on Alpaca), swept over ranks.

    python train_lora.py --demo                              # offline, tiny model, seconds
    python train_lora.py --lora-r 4 8 16 32 --train-file alpaca.jsonl
    python train_lora.py --train-file qa.jsonl --add-example "Who wrote it?" "Ann" --merge
    python train_lora.py --train-file chats.jsonl --chat-template chatml --sample-prompt "Hi!"
    accelerate launch train_lora.py --mixed-precision bf16 --gradient-checkpointing ...

The path from data to results: read the rows (instructions or conversations), render
them with their template and tokenise once (tasks/instruct.py, tasks/chat.py); then,
for each --lora-r, rebuild the base model with the same seed, wrap it in LoRA
adapters, train (core/loop.py), evaluate (eval/lm.py), save the adapter and answer
the sample prompts (eval/samples.py). Every rank sees the same data order and the
same held-out rows, so the runs differ in r alone. Finally, a plot and tables
compare the ranks.

Files: OUT/config.json, OUT/preview.txt (what is trained); OUT/r{R}/ with adapter/,
train_log.jsonl, metrics.json (and merged/ with --merge, best/ with --keep-best,
samples.json with prompts); OUT/loss_vs_r.png, OUT/sweep.md, OUT/sweep.json,
OUT/samples.md; OUT/tb/r{R}/ with --report-to tensorboard. With --demo,
OUT/base_model/ holds the tiny base the adapters load onto.
"""

import dataclasses
import json
import sys
from pathlib import Path

from core import best, checkpoint, init_from, run_dir
from core.config import parse_config
from core.demo import data_file
from core.errors import fail, run_cli
from core.loop import TrainData, plan_steps, train
from core.parallel import (Agreement, check_fsdp, gathered_weights, leave,
                           make_accelerator)
from core.trackers import Trackers
from eval.generate import load_adapted
from eval.preview import print_first, write_preview
from eval.samples import BASE_FILE, Sampler, sample_prompts, write_samples
from eval.sweep import final_train_loss, write_sweep
from tasks import quantize
from tasks.formats import row_format, tokenizer_texts
from tasks.instruct import CausalLMTask
from tasks.instruct_rows import check_added_fit, load_examples, report_encoding
from tasks.lora_config import LoraRunConfig
from tasks.lora_start import check_start
from tasks.lora_model import (LLAMA_PROJECTIONS, base_dtype, build_lora_model,
                              check_target_modules, load_tokenizer, model_config, save_adapter,
                              save_demo_base, save_merged, use_slow_tokenizer)

SWEEP_FILES = ["config.json", "base_model", "loss_vs_r.png", "sweep.md", "sweep.json", "tb",
               "preview.txt", "samples.md", BASE_FILE]

# --demo: the shipped instruction set, a tiny Llama and a BPE tokenizer trained on
# the rows; the full sweep, the preview of the first row, and two questions answered
# before and after. A --config file and flags still win. The tiny base is untrained,
# and its frozen output layer alone would cap how sharp its predictions can get, so
# the demo adapts lm_head as well as the projections.
DEMO_FLAGS = ["--train-file", data_file("qa.jsonl"), "--lora-r", "4", "8", "16", "32",
              "--target-modules", *LLAMA_PROJECTIONS, "lm_head", "--eval-fraction", "0.1",
              "--epochs", "2", "--lr", "5e-3", "--warmup-ratio", "0.05", "--batch-size", "16",
              "--eval-batch-size", "64", "--max-length", "256", "--lora-dropout", "0.0",
              "--preview", "--sample-prompt", "What is the capital of Zantheria?",
              "--sample-prompt", "Give the opposite of the word 'early'.",
              "--sample-max-new-tokens", "16"]


def finished_metrics(r_dir: Path, cfg: LoraRunConfig) -> dict | None:
    """A resumed sweep keeps the ranks that had finished."""
    path = r_dir / "metrics.json"
    return json.loads(path.read_text()) if cfg.resume_from and path.is_file() else None


def run_rank(r: int, source: str, cfg: LoraRunConfig, task: CausalLMTask, data: TrainData,
             tokenizer, accelerator, r_dir: Path, baseline: dict | None,
             trackers: Trackers, sampler: Sampler) -> dict:
    """Train one rank into r_dir, save its adapter and answer the samples; return its metrics.

    `baseline` is the untrained model's evaluation; None makes this rank compute it
    (and the base model's samples).
    """
    dtype = base_dtype(accelerator.device, cfg.mixed_precision)
    model = build_lora_model(source, r, cfg, dtype, accelerator.device).to(accelerator.device)
    trainable, total = model.get_nb_trainable_parameters()
    if baseline is None:
        # LoRA's B matrices start at zero, so the untrained model is the base model:
        # one evaluation serves as every rank's step 0. With --init-from the rank starts
        # from those weights (the loop loads them): step 0 is theirs, the samples the base's.
        model.eval()
        if accelerator.is_main_process:  # a whole model still, even under --fsdp
            sampler(model, r_dir.parent / BASE_FILE)
        if cfg.init_from:
            init_from.load(model, cfg.init_from)
        baseline = task.evaluate(model)
    resume = "latest" if cfg.resume_from and checkpoint.complete_checkpoints(
        r_dir / "checkpoints") else None
    # The rank trains in r_dir; a resume is asked of the sweep's directory, so that is
    # the --output-dir an interrupted rank's message names.
    rank_cfg = dataclasses.replace(cfg, resume_from=resume, output_dir=str(r_dir.parent),
                                   init_from=None if resume else cfg.init_from)
    result = train(model, task, data, rank_cfg, accelerator, r_dir, trackers)
    metrics = {"r": r, "lora_alpha": cfg.alpha(r), "eval_loss": result["eval"]["loss"],
               "perplexity": result["eval"]["perplexity"], "eval_loss_before": baseline["loss"],
               "init_from": cfg.init_from,
               "train_loss": result["train_loss"], "final_train_loss": final_train_loss(r_dir),
               "trainable_params": trainable, "total_params": total,
               "train_tokens_per_s": result["train_tokens_per_s"],
               "train_target_tokens_per_s": result["train_units_per_s"],
               "train_samples_per_s": result["train_samples_per_s"], "train_s": result["train_s"],
               "steps": result["steps"], "skipped_steps": result["skipped_steps"],
               "n_eval_tokens": result["eval"]["n_eval_tokens"],
               "state_mib_per_device": result["state_mib_per_device"], "use_dora": cfg.use_dora,
               "base_mib_per_device": quantize.weight_bytes(model) / 2**20, **result["keep_best"]}
    # Under --fsdp every rank hands in its shards of the adapter; rank 0 writes it whole.
    weights = gathered_weights(model, trainable_only=True) if cfg.fsdp else None
    if accelerator.is_main_process:
        save_adapter(accelerator.unwrap_model(model), tokenizer, metrics, r_dir, weights)
        if sampler.prompts:  # a sharded model answers through its saved adapter, on a fresh base
            sampler(model if weights is None else load_adapted(
                source, r_dir / "adapter", dtype).to(accelerator.device), r_dir / "samples.json")
        if cfg.merge:  # last: merging folds the adapter into the base for good
            # A sharded or quantised model cannot merge in place: the base is loaded anew.
            in_place = weights is None and not quantize.bits(cfg)
            if quantize.bits(cfg):
                accelerator.print(quantize.merge_note(cfg, r, source))
            save_merged(model if in_place else None, source, quantize.merge_dtype(cfg, dtype),
                        tokenizer, r_dir)
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # the shared accelerator drops its references to this model
    return metrics


def main(argv: list[str] | None = None) -> int:

    cfg = parse_config(LoraRunConfig, argv, __doc__, DEMO_FLAGS)
    accelerator = make_accelerator(cfg.mixed_precision)
    out_dir = run_dir.choose(cfg.output_dir, "lora-demo" if cfg.demo else "lora", accelerator)
    resuming = bool(cfg.resume_from)

    # Everything that can fail on bad input happens before the first file is written,
    # and on every rank alike (see core.parallel.Agreement).
    with Agreement(accelerator) as agreed:
        check_fsdp(accelerator, cfg)
        run_dir.check_writable(out_dir, cfg.overwrite, resuming)
        if resuming and not any((d / "metrics.json").is_file()
                                or checkpoint.complete_checkpoints(d / "checkpoints")
                                for d in out_dir.glob("r*")):
            raise fail(f"nothing to resume in {out_dir}: no rank has a checkpoint or "
                       f"metrics.json", "drop --resume-from, or point --output-dir at the "
                       "interrupted sweep")
        if resuming:
            quantize.check_resume(out_dir / "config.json", cfg)
        rows = load_examples(cfg)
        tokenizer = load_tokenizer(cfg, tokenizer_texts(cfg, rows.kind, rows.train))
        fmt = row_format(cfg, rows.kind, tokenizer)
        config = model_config(cfg, tokenizer)
        check_target_modules(config, cfg.targets, cfg.model)
        check_start(cfg, config, out_dir)
        quantize.check_base(config, cfg)
        check_added_fit(rows, cfg, fmt)
        train_enc = fmt.encode(rows.train, cfg.max_length, "the training data")
        eval_enc = fmt.encode(rows.eval, cfg.max_length, "the eval data")
        prompts = sample_prompts(cfg)
        micro_per_epoch, total_steps = plan_steps(len(train_enc.rows), cfg,
                                                  accelerator.num_processes)  # a batch filled?
        cfg = cfg.with_eval_every(total_steps)
        best.check_plan(cfg, micro_per_epoch, total_steps)  # evaluations to stop early on?
        agreed.what = {**cfg.to_dict(),
                       "training data": checkpoint.data_fingerprint(train_enc.rows),
                       "eval data": checkpoint.data_fingerprint(eval_enc.rows)}
    report_encoding(rows, train_enc, eval_enc, accelerator)
    if cfg.preview and accelerator.is_main_process:
        print_first(train_enc.rows, tokenizer)

    rank_dirs = {r: out_dir / f"r{r}" for r in cfg.lora_r}
    if accelerator.is_main_process:
        earlier = [p.name for p in out_dir.glob("r*") if p.name[1:].isdigit()]
        run_dir.create(out_dir, SWEEP_FILES + earlier, cfg.overwrite, resuming)
        for path in rank_dirs.values():
            path.mkdir(exist_ok=True)
        write_preview(out_dir / "preview.txt", train_enc.rows, tokenizer)
    # A resumed sweep keeps the config.json of the run it continues.
    if accelerator.is_main_process and not (resuming and (out_dir / "config.json").exists()):
        run_dir.write_json(out_dir / "config.json", {
            **cfg.to_dict(), "output_dir": str(out_dir), "run_name": cfg.run_name or out_dir.name,
            "world_size": accelerator.num_processes, "slow_tokenizer": use_slow_tokenizer(cfg)
            and not cfg.uses_demo_model(), **fmt.record(),
            "n_train": len(train_enc.rows), "n_eval": len(eval_enc.rows), "n_added": rows.n_added,
            "n_truncated": {"train": train_enc.truncated, "eval": eval_enc.truncated},
            "n_dropped": {"train": train_enc.dropped, "eval": eval_enc.dropped}})
    source = cfg.model
    if cfg.uses_demo_model():
        source = str(out_dir / "base_model")
        if accelerator.is_main_process and not (out_dir / "base_model").is_dir():
            save_demo_base(config, cfg.seed, Path(source))
    accelerator.wait_for_everyone()

    # One task and one batching for every rank: nothing in them depends on r.
    task = CausalLMTask(eval_enc.rows, tokenizer.pad_token_id, cfg.eval_batch_size, accelerator,
                        cfg.pad_multiple(accelerator.device))
    data = TrainData(train_enc.rows, task.collate, [len(r["input_ids"]) for r in train_enc.rows])
    kept = out_dir / "config.json"
    if resuming and not cfg.init_from and kept.is_file():  # a run begun with --init-from:
        begun = json.loads(kept.read_text()).get("init_from")  # step 0 is still its source
        cfg = dataclasses.replace(cfg, init_from=begun if begun and Path(begun).exists() else None)
    results, baseline, sampler = [], None, Sampler(prompts, fmt, cfg)
    # The fp16 loss scale adapts to a run: each rank starts from the initial one.
    fresh_scaler = accelerator.scaler.state_dict() if accelerator.scaler else None
    for r, r_dir in rank_dirs.items():
        metrics = finished_metrics(r_dir, cfg)
        if metrics is None:
            accelerator.print(f"— LoRA r={r}, alpha={cfg.alpha(r):g} —")
            if fresh_scaler:
                accelerator.scaler.load_state_dict(fresh_scaler)
            # TensorBoard: OUT/tb/r{R}/, so `tensorboard --logdir OUT/tb` overlays the ranks.
            trackers = Trackers(cfg.report_to, accelerator, out_dir / "tb" / r_dir.name,
                                f"{cfg.run_name or out_dir.name}-{r_dir.name}",
                                {**cfg.to_dict(), "lora_r": r, "lora_alpha": cfg.alpha(r)})
            metrics = run_rank(r, source, cfg, task, data, tokenizer, accelerator, r_dir,
                               baseline, trackers, sampler)
        baseline = baseline or {"loss": metrics["eval_loss_before"]}
        results.append(metrics)

    if accelerator.is_main_process:
        write_sweep(out_dir, results)
        if prompts:
            write_samples(out_dir, prompts, cfg.lora_r, dict(cfg.add_example))
        print(f"files in {out_dir}")
    # Tear down the process group: one left alive at interpreter exit can abort the process.
    accelerator.end_training()
    return 0


def cli() -> int:
    """The `rawtune-lora` console script."""
    return leave(run_cli(main))


if __name__ == "__main__":
    sys.exit(cli())
