"""The one training loop, shared by classification and LoRA fine-tuning.

The loss contract
-----------------
Each optimizer step minimises the mean loss over every *unit* of that step: every
example for classification, every target token for language modelling, counted
across all micro-batches of the accumulation window and all data-parallel ranks.
So before the window's forward passes we count its units everywhere (`n_units`),
and each micro-batch back-propagates `sum of its unit losses / n_units`. Summed
over micro-batches and ranks, the gradients are exactly those of one big batch.
(The common shortcut, a mean per micro-batch divided by the number of
micro-batches, weights a token in a short batch more than one in a long batch.)

A task plugs in through four members (see `Task`): what a unit is, how many a
batch holds, the summed loss of a batch, and how to evaluate.
"""

import math
import signal
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

from core import checkpoint
from core.batching import train_batches
from core.config import TrainConfig
from core.errors import UsageError
from core.optim import build_adamw, lr_factor, set_lr, warmup_steps_for
from core.runlog import RunLog, Timer

Batch = dict[str, torch.Tensor]


class Task(Protocol):
    unit: str  # what the loss is a mean over: "examples" or "tokens"

    def count(self, batch: Batch) -> torch.Tensor:
        """Units in a micro-batch, known before the forward pass."""

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Forward pass; the loss summed (not averaged) over the batch's units."""

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        """Metrics over the whole eval set, complete on every rank."""


@dataclass
class TrainData:
    rows: Sequence[dict]                     # tokenised examples
    collate: Callable[[list[dict]], Batch]   # examples -> padded tensors
    lengths: list[int] | None = None         # token counts, for length-grouped batching


class Stopped(UsageError):
    """The run ended early on purpose or on a fault; `code` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class _StopRequest:
    """SIGINT/SIGTERM ask the loop to checkpoint and leave at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def plan_steps(n_rows: int, cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(micro-batches per epoch on each rank, total optimizer steps of the run)."""
    micro_per_epoch = len(train_batches(n_rows, cfg.batch_size, world, 0, cfg.seed, 0))
    if micro_per_epoch == 0:
        raise UsageError(f"the training set ({n_rows} rows) cannot fill one batch per device "
                         f"— use more rows or fewer processes")
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    return micro_per_epoch, total


def _windows(data: TrainData, cfg: TrainConfig, world: int, rank: int,
             epoch: int, done: int) -> Iterator[tuple[int, int, list[list[int]]]]:
    """Accumulation windows from (epoch, micro-batches done) on: (epoch, done after, window).

    A window never straddles two epochs, so the last one of an epoch may be shorter;
    the loss contract makes a short window weigh its examples correctly.
    """
    while True:
        batches = train_batches(len(data.rows), cfg.batch_size, world, rank, cfg.seed, epoch,
                                data.lengths if cfg.group_by_length else None)
        for start in range(done, len(batches), cfg.grad_accum):
            window = batches[start:start + cfg.grad_accum]
            yield epoch, start + len(window), window
        epoch, done = epoch + 1, 0


def train(model: torch.nn.Module, task: Task, data: TrainData, cfg: TrainConfig,
          accelerator, out_dir: Path) -> dict[str, Any]:
    """Fine-tune `model` in place; return the run's figures and last evaluation."""
    world, rank = accelerator.num_processes, accelerator.process_index
    micro_per_epoch, total_steps = plan_steps(len(data.rows), cfg, world)
    warmup = warmup_steps_for(total_steps, cfg.warmup_ratio, cfg.warmup_steps)

    optimizer = build_adamw(model, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2),
                            cfg.adam_eps)
    # prepare() wraps the model for data parallelism and autocast, and the optimizer
    # for the fp16 gradient scaler. The schedule stays ours: see set_lr below.
    model, optimizer = accelerator.prepare(model, optimizer)
    fingerprint = checkpoint.fingerprint(accelerator.unwrap_model(model))
    params = [p for p in model.parameters() if p.requires_grad]
    device = accelerator.device

    state = {"step": 0, "epoch": 0, "micro_done": 0, "samples": 0, "train_s": 0.0,
             "loss_total": 0.0, "skipped": 0, "fingerprint": fingerprint}
    if cfg.resume_from:
        state = checkpoint.load(checkpoint.resolve(cfg.resume_from, out_dir), accelerator,
                                model, optimizer, fingerprint)
    log = RunLog(out_dir / "train_log.jsonl", total_steps, accelerator.is_main_process,
                 state["step"])
    log.print(f"{total_steps} optimizer steps ({micro_per_epoch} micro-batches/epoch/device, "
              f"{world} device(s), accumulation {cfg.grad_accum}, warmup {warmup})")
    timer, stop, pending = Timer(state["train_s"]), _StopRequest(), []
    last_eval: dict[str, Any] | None = None
    model.train()

    try:
        windows = _windows(data, cfg, world, rank, state["epoch"], state["micro_done"])
        while state["step"] < total_steps:
            epoch, done, window = next(windows)
            step = state["step"]
            with timer:
                batches = [{k: v.to(device, non_blocking=True) for k, v in
                            data.collate([data.rows[i] for i in idx]).items()} for idx in window]
                # counts = [units, examples, real tokens, padded tokens], summed over ranks.
                counts = accelerator.reduce(torch.stack([_counts(task, b) for b in batches])
                                            .sum(0), reduction="sum")
                n_units = counts[0].clamp(min=1)
                lr = set_lr(optimizer, cfg.lr, lr_factor(step, warmup, total_steps))
                loss_sum = torch.zeros((), device=device)
                for i, batch in enumerate(batches):
                    # Gradients are all-reduced only after the window's last micro-batch.
                    last = i == len(batches) - 1
                    with nullcontext() if last else accelerator.no_sync(model):
                        loss = task.loss_sum(model, batch)                  # forward
                        # DDP averages over ranks; times `world` turns that into a sum.
                        accelerator.backward(loss * world / n_units)        # backward
                    loss_sum += loss.detach()
                grad_norm = accelerator.clip_grad_norm_(                    # clip
                    params, cfg.max_grad_norm or float("inf"))
                step_loss = accelerator.reduce(loss_sum, reduction="sum") / n_units
                if _finite_or_skip(step_loss, grad_norm, cfg, accelerator, step, state):
                    optimizer.step()                                        # update
                optimizer.zero_grad(set_to_none=True)                       # reset
            state["step"] = step + 1
            if done == micro_per_epoch:
                state.update(epoch=epoch + 1, micro_done=0)
            else:
                state.update(epoch=epoch, micro_done=done)
            pending.append((step + 1, epoch + done / micro_per_epoch, step_loss, lr, grad_norm,
                            counts))

            finished = state["step"] == total_steps
            eval_now = (finished or (cfg.eval_every and state["step"] % cfg.eval_every == 0)
                        or (not cfg.eval_every and done == micro_per_epoch))
            save_now = cfg.save_every and state["step"] % cfg.save_every == 0
            if len(pending) >= cfg.log_every or eval_now or save_now or finished:
                _flush(pending, log, state, timer)
                pending = []
                stopping = _stop_requested(stop, accelerator)
                if stopping and not save_now:
                    save_now = True
            else:
                stopping = False
            if eval_now:
                model.eval()
                last_eval = task.evaluate(accelerator.unwrap_model(model))
                model.train()
                log.eval({"step": state["step"], "epoch": round(state["epoch"] + state["micro_done"]
                          / micro_per_epoch, 4), **_scalars(last_eval)})
            if save_now:
                state["train_s"] = timer.elapsed
                path = checkpoint.save(out_dir / "checkpoints", state["step"], accelerator, model,
                                       optimizer, state, cfg.keep_checkpoints)
                log.print(f"checkpoint saved: {path}")
                if stopping:
                    raise Stopped(f"interrupted at step {state['step']}; checkpoint saved to {path} "
                                  f"— continue with --resume-from latest --output-dir {out_dir}",
                                  code=128 + stop.signum)
    finally:
        log.close()
        stop.restore()

    steps_run = max(1, state["step"])
    return {"eval": last_eval, "steps": state["step"], "train_s": timer.elapsed,
            "train_samples_per_s": state["samples"] / max(timer.elapsed, 1e-9),
            "train_loss": state["loss_total"] / steps_run, "skipped_steps": state["skipped"],
            "total_steps": total_steps}


def _counts(task: Task, batch: Batch) -> torch.Tensor:
    mask = batch.get("attention_mask")
    real = mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel())
    return torch.stack([task.count(batch), torch.tensor(len(batch["input_ids"])), real,
                        torch.tensor(batch["input_ids"].numel())]).to(real.device, torch.float64)


def _finite_or_skip(loss: torch.Tensor, grad_norm: torch.Tensor, cfg: TrainConfig, accelerator,
                    step: int, state: dict[str, Any]) -> bool:
    """Whether to apply this step. A non-finite loss or gradient stops the run unless skipped.

    With fp16 the gradient scaler already skips overflowing steps (and lowers its
    scale), so only bf16/fp32 runs are checked here. The check costs one device sync.
    """
    if cfg.mixed_precision == "fp16" or bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
        return True
    if cfg.skip_nonfinite:
        state["skipped"] += 1
        return False
    raise Stopped(f"non-finite loss or gradient norm at step {step + 1} (loss {float(loss)}, "
                  f"grad norm {float(grad_norm)}) — lower --lr, check the data, or pass "
                  f"--skip-nonfinite; the last checkpoint is kept", code=1)


def _flush(pending: list, log: RunLog, state: dict[str, Any], timer: Timer) -> None:
    """Read the buffered step figures back from the device (one sync) and log them."""
    elapsed = max(timer.elapsed - state.get("logged_s", state["train_s"]), 1e-9)
    steps = len(pending)
    for step, epoch, loss, lr, grad_norm, counts in pending:
        units, examples, real, padded = counts.tolist()
        loss = float(loss)
        state["loss_total"] += loss
        state["samples"] += examples
        log.step({"step": step, "epoch": round(epoch, 4), "loss": loss, "lr": lr,
                  "grad_norm": float(grad_norm), "samples_per_s": examples * steps / elapsed,
                  "tokens_per_s": real * steps / elapsed, "units": int(units),
                  "padding": 1 - real / padded, "skipped": state["skipped"]})
    state["logged_s"] = timer.elapsed


def _stop_requested(stop: _StopRequest, accelerator) -> bool:
    """A signal seen by any rank stops all of them at the same step."""
    flag = torch.tensor(float(stop.signum is not None), device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    if flag.item() and stop.signum is None:
        stop.signum = signal.SIGTERM
    return bool(flag.item())


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
