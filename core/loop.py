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

The host never waits for the device inside a step
--------------------------------------------------
Python queues step after step while the accelerator works through them; it waits
only every --log-every steps (and before an evaluation or a checkpoint), when
`_flush` reads the buffered losses back. So whatever needs a step's results is
decided there: the log line, a fault, a stop request. Until then, a step whose loss
or gradient norm is not finite is skipped on the device (see `_optimizer_step`;
fp16 is the exception, as its gradient scaler reports skips to the host only).

Skipped steps and the schedule
------------------------------
As in HF Trainer, the learning rate follows the steps *applied* so far: a skipped step
(non-finite, or an fp16 overflow) leaves the schedule where it was, yet counts towards
the run's total steps, so a run that skipped k steps ends k steps short of a zero lr.
The count of applied steps is kept on the device and the lr computed there from it,
which the fused AdamW reads as a tensor: no wait.

Stopping and resuming
---------------------
SIGINT/SIGTERM on any rank make every rank checkpoint after the same step (the next
read-back) and exit with 128 + the signal's number; a non-finite loss or gradient
norm stops the run (exit 1) naming the step, which was not applied, and keeps the
last checkpoint, unless --skip-nonfinite. A checkpoint holds the weights, optimizer,
counters, position in the epoch and every rank's RNG states, and the batch order is
a pure function of (seed, epoch), so a resumed run repeats the uninterrupted one bit
for bit on a deterministic device. It must keep the run's plan (total steps, batch layout,
tokenised data, AdamW's weight decay, betas and eps): anything else would change the
schedule or the batches, or be overwritten by the saved optimizer state. To go on under
another plan, --init-from starts a new run from a checkpoint's weights alone
(core/init_from.py).
"""

import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

from core import checkpoint, host_memory, init_from, parallel
from core.attention import use_lane_attention
from core.batching import train_batches
from core.best import BestKeeper
from core.compiling import compile_model
from core.config import TrainConfig
from core.dropout import lane_dropout_runs, use_lane_dropout
from core.errors import UsageError
from core.flops import StepFlops, peak_tflops
from core.optim import build_adamw, clip_gradients, lr_factor, set_lr, warmup_steps_for
from core.runlog import RunLog, Timer
from core.trackers import Trackers

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
    """SIGINT/SIGTERM ask the loop to checkpoint and leave: after the current step with
    one process, at the next read-back of the figures with several (--log-every).

    A second signal is not deferred: it raises KeyboardInterrupt at once, for a user
    who would rather lose the steps since the last checkpoint than wait.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def flag(self) -> torch.Tensor:
        return torch.tensor([float(self.signum is not None)], dtype=torch.float64)

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
          accelerator, out_dir: Path, trackers: Trackers | None = None) -> dict[str, Any]:
    """Fine-tune `model` in place; return the run's figures and the evaluation of the
    weights it ends with (with --keep-best, the best evaluation's)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    micro_per_epoch, total_steps = plan_steps(len(data.rows), cfg, world)
    warmup = warmup_steps_for(total_steps, cfg.warmup_ratio, cfg.warmup_steps)
    # What fixes the schedule and the batches: a resumed run must agree on all of it.
    plan = {"total_steps": total_steps, "world_size": world, "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum, "seed": cfg.seed, "group_by_length": cfg.group_by_length,
            "warmup_steps": warmup, "train_rows": len(data.rows), "fsdp": cfg.fsdp,
            "train_data": checkpoint.data_fingerprint(data.rows)}
    # So must the optimizer settings its saved state carries: loading it would bring them back.
    plan.update({"weight_decay": cfg.weight_decay, "adam_beta1": cfg.adam_beta1,
                 "adam_beta2": cfg.adam_beta2, "adam_eps": cfg.adam_eps})
    plan["keep_best"] = cfg.keep_best  # the best so far a checkpoint carries is of this metric

    device, ckpt_root = accelerator.device, out_dir / "checkpoints"
    # What malloc does with each step's freed memory: reuse it, or give it back (host_memory).
    memory = host_memory.use_policy(cfg.cpu_memory, model) if device.type == "cpu" else None
    if lane_dropout_runs(cfg, device):
        use_lane_dropout(model)  # cheaper masks, same distribution (core/dropout.py)
        use_lane_attention(model)  # attention dropout a cache-sized chunk at a time
    # Counted before prepare(): a data-parallel wrapper hides the model's config.
    flops = StepFlops(model)
    # Names and (global) shapes, sharded or not, and whether only adapters train.
    identity = checkpoint.identity(model)
    if cfg.init_from:  # a new run from an earlier one's weights: all else starts fresh
        init_from.load(model, cfg.init_from)
    if cfg.fsdp:  # in place, before the optimizer: it must hold the sharded weights
        model = parallel.shard(model.to(device), accelerator, cfg.mixed_precision)
    optimizer = build_adamw(model, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2),
                            cfg.adam_eps)
    if cfg.compile:
        compile_model(model)  # block by block, in place (core/compiling.py)
    # prepare() wraps the model for data parallelism and autocast, and the optimizer
    # for the fp16 gradient scaler. The schedule stays ours: see set_lr below.
    if cfg.fsdp:  # FSDP is the model's parallel wrapper, its mixed-precision policy autocast
        optimizer = accelerator.prepare_optimizer(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]

    state = {"step": 0, "epoch": 0, "micro_done": 0, "samples": 0, "tokens": 0, "units": 0,
             "train_s": 0.0,
             "logged_s": 0.0, "loss_total": 0.0, "skipped": 0, **identity, "plan": plan}
    resumed = checkpoint.resolve(cfg.resume_from, out_dir) if cfg.resume_from else None
    if resumed:
        state = checkpoint.load(resumed.path, accelerator, model, optimizer, identity, plan)
    # Applied steps drive the schedule (see the module's docstring). A checkpoint follows a
    # read-back, so its counters give their number exactly.
    applied_steps = torch.tensor(float(state["step"] - state["skipped"]), dtype=torch.float64,
                                 device=device)
    best = BestKeeper(cfg, out_dir, state, accelerator)  # --keep-best, --early-stopping-patience
    log = RunLog(out_dir / "train_log.jsonl", total_steps, accelerator.is_main_process,
                 state["step"], trackers)
    log.print(f"{total_steps} optimizer steps ({micro_per_epoch} micro-batches/epoch/device, "
              f"{world} device(s){', FSDP' if cfg.fsdp else ''}, accumulation {cfg.grad_accum}, "
              f"warmup {warmup}" + (f", CPU memory: {memory}" if memory else "") + ")"
              + (f", resumed at step {state['step']}" if state["step"] else ""))
    for line in resumed.skipped if resumed else []:
        log.print(line)
    timer, stop, pending = Timer(state["train_s"]), _StopRequest(), []
    meter = _Meter(flops, peak_tflops(device, cfg.peak_tflops), world)
    read_back_every = cfg.read_back_every(device)
    last_eval: dict[str, Any] | None = None
    model.train()

    try:
        windows = _windows(data, cfg, world, rank, state["epoch"], state["micro_done"])
        while state["step"] < total_steps and not best.stopped:
            epoch, done, window = next(windows)
            step = state["step"]
            with timer:
                host_batches = [data.collate([data.rows[i] for i in idx]) for idx in window]
                batches = [{k: _to_device(v, device) for k, v in b.items()} for b in host_batches]
                # One all-reduce before any forward pass gives every rank the window's
                # [units, examples, real tokens, padded tokens, token pairs] and whether
                # any rank was signalled, so all ranks stop after the same step.
                local = torch.cat([sum(_counts(task, b) for b in host_batches), stop.flag()])
                counts = accelerator.reduce(_to_device(local, device), reduction="sum")
                n_units = counts[0].clamp(min=1)
                lr = cfg.lr * lr_factor(applied_steps, warmup, total_steps)  # schedule
                loss_sum = torch.zeros((), device=device)
                for i, batch in enumerate(batches):
                    # Gradients are all-reduced only after the window's last micro-batch.
                    last = i == len(batches) - 1
                    with parallel.gradient_sync(model, accelerator, sync=last):
                        loss = task.loss_sum(model, batch)                  # forward + loss
                        # DDP and FSDP average over ranks; times `world` makes it a sum.
                        accelerator.backward(loss * world / n_units)        # backward
                    loss_sum += loss.detach()
                grad_norm = parallel.local(clip_gradients(                  # clip
                    accelerator, params, cfg.max_grad_norm or float("inf")))
                step_loss = accelerator.reduce(loss_sum, reduction="sum") / n_units
                # Loss and norm are global, so every rank takes the same decision.
                finite = _finite(step_loss, grad_norm, cfg)
                with set_lr(optimizer, lr):
                    applied = _optimizer_step(optimizer, accelerator, finite)  # update, if finite
                applied_steps += applied
                optimizer.zero_grad(set_to_none=True)                       # reset

            state["step"] = step + 1
            state["epoch"], state["micro_done"] = ((epoch + 1, 0) if done == micro_per_epoch
                                                   else (epoch, done))
            pending.append({"step": step + 1, "epoch": epoch + done / micro_per_epoch,
                            "figures": torch.cat([counts, torch.stack([x.to(device).double() for x
                                in (step_loss, grad_norm, finite, applied, lr)])])})
            finished = state["step"] == total_steps
            eval_now = (finished or (cfg.eval_every and state["step"] % cfg.eval_every == 0)
                        or (not cfg.eval_every and done == micro_per_epoch))
            save_now = finished or (cfg.save_every and state["step"] % cfg.save_every == 0)
            # One process knows of a signal at once; several learn of it in the next all-reduce.
            signalled = world == 1 and stop.signum is not None
            if len(pending) < read_back_every and not (eval_now or save_now or signalled):
                continue  # nothing needs this step's results yet: queue the next one

            fault, stopping = _flush(pending, log, state, timer, meter,
                                     stop_at_fault=not cfg.skip_nonfinite)
            pending, stopping = [], stopping or signalled
            if fault:
                raise _nonfinite_error(fault, ckpt_root, _resume_command(cfg, out_dir))
            if eval_now:
                last_eval = _evaluate(model, task, accelerator, log, state, micro_per_epoch)
                finished = best.update(last_eval, state["step"], model, log) or finished
            if save_now or finished or stopping:  # a signal on any rank: checkpoint and leave
                state["train_s"] = timer.elapsed
                path = checkpoint.save(ckpt_root, state["step"], accelerator, model, optimizer,
                                       state, cfg.keep_checkpoints)
                log.print(f"checkpoint saved: {path}")
                if stopping and not finished:
                    raise Stopped(f"interrupted at step {state['step']} of {total_steps}; "
                                  f"checkpoint saved to {path} — continue with "
                                  f"{_resume_command(cfg, out_dir)}",
                                  code=128 + (stop.signum or signal.SIGTERM))
        if last_eval is None:  # resumed from the final checkpoint: nothing left but to score
            last_eval = _evaluate(model, task, accelerator, log, state, micro_per_epoch)
        kept_eval = best.restore(model, task, last_eval, state["step"], log)
    finally:
        log.close()
        stop.restore()

    applied_steps = max(1, state["step"] - state["skipped"])
    return {"eval": kept_eval, "keep_best": best.report(last_eval, state["step"]),
            "steps": state["step"], "train_s": timer.elapsed,
            "train_samples_per_s": state["samples"] / max(timer.elapsed, 1e-9),
            "train_tokens_per_s": state["tokens"] / max(timer.elapsed, 1e-9),
            "train_units_per_s": state["units"] / max(timer.elapsed, 1e-9),
            "train_loss": state["loss_total"] / applied_steps, "skipped_steps": state["skipped"],
            "total_steps": total_steps,
            # This device's share of weights and optimizer state: 1/N of it under --fsdp.
            "state_mib_per_device": parallel.state_bytes(model, optimizer.optimizer) / 2**20}


def _counts(task: Task, batch: Batch) -> torch.Tensor:
    """[units, examples, real tokens, padded tokens, token pairs] of a micro-batch on the host.

    Token pairs (the sum over examples of length**2) price attention, for MFU.
    """
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    lengths = (mask.sum(1) if mask is not None else torch.full((len(ids),), ids.shape[1])).double()
    return torch.stack([torch.as_tensor(task.count(batch), dtype=torch.float64),
                        torch.tensor(float(len(ids)), dtype=torch.float64), lengths.sum(),
                        torch.tensor(float(ids.numel()), dtype=torch.float64),
                        (lengths ** 2).sum()])


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-to-device copy the host need not wait for: on CUDA, from pinned memory."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _finite(loss: torch.Tensor, grad_norm: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Whether this step's loss and gradient norm are finite, as a tensor on the device.

    With fp16 the gradient scaler already skips steps whose scaled gradients overflow,
    so there only the (unscaled) loss is checked: a non-finite loss is bad data or a
    diverged model, which no scale can fix.
    """
    if cfg.mixed_precision == "fp16":
        return torch.isfinite(loss)
    return torch.isfinite(loss) & torch.isfinite(grad_norm)


def _optimizer_step(optimizer, accelerator, finite: torch.Tensor) -> torch.Tensor:
    """Apply the update unless `finite` is False; return whether it was applied.

    The fused AdamW takes that decision inside its kernel: given `found_inf` (the flag
    PyTorch's gradient scaler hands it), it leaves weights and optimizer state as they
    were, and the host does not wait for the device. fp16's scaler reports its own
    skips only to the host, and other optimizers take no flag: those steps wait.
    """
    inner, scaler = optimizer.optimizer, accelerator.scaler  # accelerate wraps the optimizer
    if scaler is None and inner.defaults.get("fused"):
        inner.found_inf = (~finite).float()
        try:
            optimizer.step()
        finally:
            del inner.found_inf
        return finite
    applied = bool(finite)
    if scaler is None:
        if applied:
            optimizer.step()
    elif not applied:
        scaler.update()  # ends the step clipping unscaled, as step() would have
    else:
        before = scaler.get_scale()
        optimizer.step()
        # The scaler lowers its scale exactly when it skips. (Accelerate's step_was_skipped
        # misses skips a fused optimizer makes inside its kernel, as ours does.)
        applied = scaler.get_scale() >= before
    return torch.tensor(applied, device=finite.device)


@dataclass
class _Fault:
    step: int
    loss: float
    grad_norm: float


def _resume_command(cfg: TrainConfig, out_dir: Path) -> str:
    """What continues this run: the same command with --resume-from and the run's
    --output-dir (a LoRA rank's sweep's), without --init-from (which starts a new run)."""
    return (f"the same command{' without --init-from' if cfg.init_from else ''} and "
            f"--resume-from latest --output-dir {cfg.output_dir or out_dir}")


def _nonfinite_error(fault: _Fault, ckpt_root: Path, resume: str) -> Stopped:
    saved = checkpoint.complete_checkpoints(ckpt_root)
    kept = (f"the last good checkpoint, {saved[-1]}, is kept ({resume} continue from it)"
            if saved else "no checkpoint was saved")
    return Stopped(f"non-finite loss or gradient norm at step {fault.step} (loss {fault.loss}, "
                   f"grad norm {fault.grad_norm}); the step was not applied and {kept} — lower "
                   f"--lr, check the data, or pass --skip-nonfinite to skip such steps", code=1)


def _evaluate(model, task: Task, accelerator, log: RunLog, state: dict[str, Any],
              micro_per_epoch: int) -> dict[str, Any]:
    model.eval()
    metrics = task.evaluate(accelerator.unwrap_model(model))
    model.train()
    log.eval({"step": state["step"],
              "epoch": round(state["epoch"] + state["micro_done"] / micro_per_epoch, 4),
              **_scalars(metrics)})
    return metrics


@dataclass
class _Meter:
    flops: StepFlops
    peak_tflops: float | None   # of one device; None: MFU is not reported
    devices: int


def _flush(pending: list[dict], log: RunLog, state: dict[str, Any], timer: Timer,
           meter: _Meter, stop_at_fault: bool) -> tuple[_Fault | None, bool]:
    """Read the buffered steps back from the device (one wait) and log them.

    Returns, with `stop_at_fault`, the first step that was not finite (the records end
    there: the run is about to stop), and whether any rank was signalled.
    Throughput is averaged over the steps read back together: one step's time is not
    observable without a wait per step.
    """
    with timer:  # waiting here for the queued steps to finish is training time too
        rows = torch.stack([p["figures"] for p in pending]).tolist()
    per_step = max(timer.elapsed - state["logged_s"], 1e-9) / len(pending)
    state["logged_s"] = timer.elapsed
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        memory = {"peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20}
    else:  # a CPU's memory is the host's: its peak resident set
        memory = host_memory.peak_rss()
    stopping, fault = False, None
    for p, (units, examples, real, padded, pairs, signal_, loss, grad_norm, finite,
            applied, lr) in zip(pending, rows):
        stopping = stopping or signal_ > 0
        state["skipped"] += not applied
        if applied:  # a skipped step's loss is not finite: keep it out of the mean
            state["loss_total"] += loss
        state["samples"] += examples
        state["tokens"] += real
        state["units"] += units
        # Counts are summed over ranks: per device, to compare with one device's peak.
        tflops = meter.flops(real, examples, pairs) / per_step / 1e12 / meter.devices
        record = {"step": p["step"], "epoch": round(p["epoch"], 4), "loss": loss, "lr": lr,
                  "grad_norm": grad_norm, "samples_per_s": examples / per_step,
                  "tokens_per_s": real / per_step, "units": int(units),
                  "padding": 1 - real / padded, "tflops": tflops, "skipped": state["skipped"]}
        if meter.peak_tflops:
            record["mfu"] = tflops / meter.peak_tflops
        record.update(memory)
        log.step(record)
        if not finite and stop_at_fault:
            fault = _Fault(p["step"], loss, grad_norm)
            break
    return fault, stopping


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
