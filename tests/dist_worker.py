"""Drives core.loop.train on a tiny dropout-free model, on one rank or under torchrun.

    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py --out DIR
    python tests/dist_worker.py --out DIR --grad-accum 2

tests/test_distributed.py runs it both ways and compares. Dropout is off because each
rank draws its own masks, so only a deterministic model can match one process. Rank 0
writes `result.json` (evaluations, figures, predictions) and `final.pt` (weights);
`--stdio DIR` sends each rank's stdout/stderr to DIR/rank{r}.out|.err so a test can see
who printed what. A task is a builder in TASKS; `--also TASK DIR` trains a further task
in the same job (same ranks, batch size and accumulation) into DIR, so one torchrun
launch proves several tasks. result.json also holds every training micro-batch of every
rank (`micro`: unit count, summed loss, its rows) for the test to regroup by step.
"""

import argparse
import errno
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.parallel import leave  # noqa: E402

N_TRAIN, N_EVAL, VOCAB = 48, 37, 64  # 37 eval rows: a world of 2 cannot split them evenly
PAD, BOS, EOS = 0, 1, 2  # the LM rows' special ids; content ids are 3..VOCAB-1
IGNORE = -100


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """Rows of 5..21 tokens, labelled by whether the first content token is in the low half."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 21, (1,), generator=g))
        ids = torch.randint(2, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": [1] + ids, "labels": int(ids[0] < VOCAB // 2)})
    return rows


def build_cls(cfg, accelerator):
    from transformers import AutoModelForSequenceClassification

    from core.demo import tiny_distilbert_config
    from tasks.classification import ClassificationTask
    torch.manual_seed(0)  # the same initial weights on every rank and in every run
    model = AutoModelForSequenceClassification.from_config(
        tiny_distilbert_config(VOCAB, num_labels=2, max_length=32, dropout=0.0))
    task = ClassificationTask(synthetic_rows(N_EVAL, 2), pad_id=0,
                              eval_batch_size=cfg.eval_batch_size, num_labels=2,
                              accelerator=accelerator)
    return model, task, synthetic_rows(N_TRAIN, 1)


def lm_rows(n: int, seed: int) -> list[dict]:
    """Prompt/response rows of very unequal lengths: only the response and EOS are targets.

    A prompt has 1..12 tokens after BOS and a response 1..15 tokens before EOS, so
    micro-batches of the same size hold different numbers of target tokens. Every other
    response repeats one token (soon easy) while the rest are random (stay hard), so
    per-token losses differ between rows and a per-micro-batch mean weights them wrongly.
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        n_prompt, n_response = (int(torch.randint(1, k, (1,), generator=g)) for k in (13, 16))
        prompt = torch.randint(3, VOCAB, (n_prompt,), generator=g).tolist()
        if i % 2:
            response = torch.randint(3, VOCAB, (n_response,), generator=g).tolist()
        else:
            response = [prompt[0]] * n_response
        rows.append({"input_ids": [BOS] + prompt + response + [EOS],
                     "labels": [IGNORE] * (1 + n_prompt) + response + [EOS]})
    return rows


def build_lm(cfg, accelerator):
    """A tiny Llama with LoRA adapters (dropout 0) on every projection, as train_lora builds it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from core.demo import tiny_llama_config
    from tasks.instruct import CausalLMTask
    torch.manual_seed(0)  # the same base weights and adapter draws on every rank and run
    base = AutoModelForCausalLM.from_config(tiny_llama_config(VOCAB, max_length=64))
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                      "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, lora)
    # Eval batches of one row: each row's loss is then computed on the same unpadded
    # input on any rank, so only the (exact, see test) float64 sums differ in order.
    task = CausalLMTask(lm_rows(N_EVAL, 4), pad_id=PAD, eval_batch_size=1,
                        accelerator=accelerator)
    return model, task, lm_rows(N_TRAIN, 3)


TASKS = {"cls": build_cls, "lm": build_lm}
# LoRA's few weights take a higher rate: the LM rows must become unequally hard in 12 steps.
LR = {"cls": 1e-3, "lm": 1e-2}


def record_micro_batches(task, rank: int) -> list[dict]:
    """Wrap task.loss_sum to log each training micro-batch: units, summed loss, rows."""
    micro, real = [], task.loss_sum

    def loss_sum(model, batch):
        loss = real(model, batch)
        rows = [ids[mask.bool()].tolist()
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        micro.append({"rank": rank, "call": len(micro), "units": float(task.count(batch)),
                      "loss_sum": float(loss.detach()), "rows": rows})
        return loss

    task.loss_sum = loss_sum
    return micro


def fail_disk_from_save(n: int) -> None:
    """From this process's n-th checkpoint save on, every fsync fails as a dying disk's does."""
    from core import checkpoint
    real, saves = checkpoint.save, {"n": 0}

    def failing_fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def save(*args, **kwargs):
        saves["n"] += 1
        if saves["n"] == n:
            os.fsync = failing_fsync
        return real(*args, **kwargs)

    checkpoint.save = save


def main(argv: list[str] | None = None) -> int:
    from core.parallel import make_accelerator

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--task", default="cls", choices=sorted(TASKS))
    parser.add_argument("--also", nargs=2, action="append", default=[], metavar=("TASK", "DIR"),
                        help="then train TASK into DIR in the same job (repeatable)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stdio", help="directory for each rank's stdout/stderr")
    parser.add_argument("--signal-rank", type=int, help="this rank sends itself SIGTERM ...")
    parser.add_argument("--signal-at", type=int, help="... before its n-th training forward")
    parser.add_argument("--fsdp", action="store_true", help="shard the model (FSDP2)")
    parser.add_argument("--fail-save-rank", type=int, help="this rank's disk fails (EIO) ...")
    parser.add_argument("--fail-save-at", type=int, help="... from its n-th checkpoint save on")
    args = parser.parse_args(argv)
    for name, _ in args.also:
        if name not in TASKS:
            parser.error(f"--also: unknown task {name!r} (choose from {', '.join(sorted(TASKS))})")

    torch.set_num_threads(1)  # the test machine is small and shared
    accelerator = make_accelerator("no")  # as the scripts join torchrun's group
    rank = accelerator.process_index
    if args.stdio:
        Path(args.stdio).mkdir(parents=True, exist_ok=True)
        for fd, suffix in ((1, "out"), (2, "err")):
            with open(Path(args.stdio) / f"rank{rank}.{suffix}", "w") as f:
                os.dup2(f.fileno(), fd)

    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    print(f"rank {rank} of {accelerator.num_processes}, backend {backend}, "
          f"{accelerator.distributed_type.value}", flush=True)
    code = run_task(args.task, Path(args.out), args, accelerator, signal_rank=args.signal_rank)
    for name, out in args.also:
        if code != 0:
            break
        code = run_task(name, Path(out), args, accelerator, signal_rank=None)
    print(f"rank {rank} done, exit {code}", flush=True)
    accelerator.end_training()  # a live gloo group at interpreter exit can abort the process
    return code


def run_task(name: str, out: Path, args, accelerator, signal_rank: int | None) -> int:
    """Train task `name` into `out`; rank 0 writes result.json and final.pt. The exit code."""
    from accelerate.utils import gather_object

    from core.config import TrainConfig
    from core.errors import run_cli
    from core.loop import TrainData, train
    from eval.lm import evaluate_lm

    rank = accelerator.process_index
    cfg = TrainConfig(model="tiny", batch_size=args.batch_size, grad_accum=args.grad_accum,
                      eval_batch_size=4, epochs=2, lr=LR[name], warmup_steps=2, weight_decay=0.01,
                      group_by_length=False, seed=0, eval_every=0, save_every=5, log_every=4,
                      keep_checkpoints=3, resume_from="latest" if args.resume else None,
                      fsdp=args.fsdp)
    model, task, rows = TASKS[name](cfg, accelerator)
    model.eval()
    initial = task.evaluate(model)  # the same weights everywhere: must match one process exactly
    extra = {}
    if name == "lm":  # the same weights in padded batches of 4, split unevenly across ranks
        extra["initial_eval_batch4"] = evaluate_lm(model, task.eval_rows, task.collate, 4,
                                                   accelerator)
    initial_predictions = getattr(task, "predictions", None)
    data = TrainData(rows, task.collate, [len(r["input_ids"]) for r in rows])
    micro = record_micro_batches(task, rank)

    if signal_rank == rank:
        calls, real = {"n": 0}, task.loss_sum

        def loss_sum(model, batch):
            calls["n"] += 1
            if calls["n"] == args.signal_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(model, batch)

        task.loss_sum = loss_sum

    if args.fail_save_rank == rank:
        fail_disk_from_save(args.fail_save_at)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    result = {}

    def run(_argv):
        result.update(train(model, task, data, cfg, accelerator, out))
        return 0

    code = run_cli(run)
    if code == 0:
        micro = gather_object(micro)  # every rank's micro-batches, on every rank
    if code == 0 and accelerator.is_main_process:
        torch.save({k: v.detach().cpu() for k, v in
                    accelerator.unwrap_model(model).state_dict().items()}, out / "final.pt")
        (out / "result.json").write_text(json.dumps({
            "task": name, "initial_eval": initial, "initial_predictions": initial_predictions,
            **extra, "final_eval": result["eval"], "steps": result["steps"],
            "train_loss": result["train_loss"], "world": accelerator.num_processes,
            "grad_accum": cfg.grad_accum, "micro": micro}))
    return code


if __name__ == "__main__":
    sys.exit(leave(main()))  # as the scripts end: a launched rank skips Python's teardown
