"""Several processes: joining the launcher's process group, data parallelism, FSDP2.

`torchrun` and `accelerate launch` start one process per device and tell each, in
its environment (RANK, WORLD_SIZE, ...), how to meet the others. Accelerate joins
that group on GPUs (nccl); on a machine without one it must be told to use the CPU
(gloo), or every process trains alone. A process that finds WORLD_SIZE > 1 but no
group refuses to start: N copies of one run writing into one directory is the
failure this module exists to prevent.

Two ways to use the processes:
- data parallelism (the default): every process holds the whole model, trains on
  its share of each global batch, and gradients are averaged (DDP, via Accelerate);
- `--fsdp`: PyTorch's FSDP2 (`fully_shard`) keeps 1/N of every weight, gradient and
  optimizer moment per process and gathers a block's weights just before it runs.
  Each transformer block is a unit, so at most one block (plus the root's
  embeddings and head) is whole at any time. Gradients are reduce-scattered with
  the same averaging as DDP, so the loop's loss scaling holds unchanged.

Accelerate wraps FSDP on GPUs only; calling `fully_shard` here keeps one code path
for CPU (gloo, as the tests run) and GPU (nccl).
"""

import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterator

import torch

from core.errors import UsageError, fail


def leave(code: int) -> int:
    """The script's exit code; a process started by a launcher exits here with it instead.

    `destroy_process_group` (in `accelerator.end_training()`) unregisters the group, but
    its gloo backend and that backend's threads live on while anything refers to it, and
    under FSDP torch's DTensor caches refer to the device mesh, so to the group, until
    Python tears its modules down. Destroyed that late, the backend can abort the process
    ("terminate called without an active exception": about one 2-process FSDP run in ten
    here), turning a finished run into a failed job. So a launched process skips that
    teardown. rawtune's files are written, synced and closed by now and its trackers
    finished; what else runs at exit (atexit hooks, e.g. coverage) does not run.
    """
    if "LOCAL_RANK" not in os.environ:  # set by torchrun and accelerate launch
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launched_world_size() -> int:
    """How many processes the launcher says the job has (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (avx512_bf16 or AMX) that oneDNN uses.
    Without them torch multiplies bf16 in its reference kernel, 50-400x slower than fp32
    (measured 2026-11-28 on an AMD EPYC with AVX2 only: 1.2 against 90 GFLOP/s)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def make_accelerator(mixed_precision: str):
    """Accelerate's state for this process, joined to the launcher's process group."""
    from accelerate import Accelerator
    # Without a GPU, Accelerate joins a launched group only when told to run on the CPU.
    on_cpu = "LOCAL_RANK" in os.environ and not torch.cuda.is_available()
    try:
        accelerator = Accelerator(mixed_precision=mixed_precision, cpu=on_cpu)
    except ValueError as err:  # e.g. fp16 on a CPU, bf16 on a GPU without it
        raise UsageError(f"--mixed-precision {mixed_precision} is not available here "
                         f"({str(err).splitlines()[0][:160]}) — pick another --mixed-precision, "
                         f"or 'no'") from None
    if mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate may accept it, then neither autocasts nor scales: an fp32 run in disguise.
        raise fail("--mixed-precision fp16 is not available here (a CPU has no fp16 autocast "
                   "with a gradient scaler)", "use --mixed-precision bf16 or no on a CPU")
    if (mixed_precision == "bf16" and accelerator.device.type == "cpu"
            and not cpu_multiplies_bf16()):
        accelerator.print("warning: this CPU has no bf16 matrix instructions (avx512_bf16 or "
                          "AMX): bf16 runs 50-400x slower than fp32 here; --mixed-precision no "
                          "is the fast choice")
    if accelerator.num_processes != launched_world_size():
        raise fail(f"the launcher started {launched_world_size()} processes but this one would "
                   f"train alone ({accelerator.distributed_type.value}), so each would write the "
                   f"same run", "launch with torchrun --nproc_per_node N or accelerate launch "
                   "--num_processes N, or run the script with python for one process")
    return accelerator


class Agreement:
    """A block of set-up that every rank passes, or none: `with Agreement(acc) as agreed:`.

    Bad input found on one rank alone (a file missing on one node) would leave the
    others waiting in the next collective; and ranks launched with different flags or
    data would train different runs into one directory. On leaving the block, the
    ranks swap their error (if any) and `agreed.what` (settings, data fingerprints);
    if any rank failed or any value differs, every rank raises the same one line.
    """

    def __init__(self, accelerator):
        self.accelerator, self.what = accelerator, {}

    def __enter__(self) -> "Agreement":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self.accelerator.num_processes == 1 or (kind and not issubclass(kind, UsageError)):
            return  # one process, or a bug: raise it as it is (the launcher ends the others)
        from accelerate.utils import gather_object
        everyone = gather_object([(str(error) if error else None, self.what)])
        failed = [(rank, message) for rank, (message, _) in enumerate(everyone) if message]
        if failed:
            rank, message = failed[0]
            raise UsageError(message if rank == 0 else f"(rank {rank}) {message}") from None
        first = everyone[0][1]
        differ = sorted({k for _, what in everyone for k in first if what.get(k) != first[k]})
        if differ:
            raise fail(f"the {len(everyone)} processes disagree on {', '.join(differ)}",
                       "give every process the same flags, config file and data")


def check_fsdp(accelerator, cfg) -> None:
    """Settings --fsdp cannot honour, refused before anything is written."""
    if not cfg.fsdp:
        return
    if not torch.distributed.is_initialized():
        raise fail("--fsdp shards the model across the processes of a launcher, and this one "
                   "was started alone", "launch with torchrun --nproc_per_node N (N = 1 is "
                   "fine) or drop --fsdp")
    if cfg.mixed_precision == "fp16":
        raise fail("--fsdp with --mixed-precision fp16 is not supported (fp16 needs a gradient "
                   "scaler over sharded gradients)", "use --mixed-precision bf16")
    if cfg.mixed_precision == "bf16" and accelerator.device.type == "cpu":
        raise fail("--fsdp with --mixed-precision bf16 needs GPUs (gloo, the CPU backend, "
                   "cannot reduce bf16 gradients)", "use --mixed-precision no on CPU")
    if cfg.compile:
        raise fail("--fsdp with --compile is not supported", "drop one of the two")


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def _block_classes(model: torch.nn.Module) -> set[str]:
    """The model's transformer-block class names (HF's `_no_split_modules`)."""
    for module in model.modules():  # a PeftModel holds the transformers model inside
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def shard(model: torch.nn.Module, accelerator, mixed_precision: str) -> torch.nn.Module:
    """FSDP2 in place: each transformer block a unit, then the root (embeddings, head).

    With bf16, weights are gathered and computed in bf16 while the sharded master
    copies (and the gradients' reduction) stay fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision == "bf16" else MixedPrecisionPolicy())
    blocks = _block_classes(model)
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@contextmanager
def gradient_sync(model: torch.nn.Module, accelerator, sync: bool) -> Iterator[None]:
    """Reduce gradients across ranks after this backward only if `sync`.

    Accumulation without sync: DDP keeps local sums (Accelerate's no_sync), FSDP keeps
    unsharded local sums; either way the window's last micro-batch reduces them once.
    """
    if sync:
        yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(model):
            yield


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP's gradient norm) as the plain tensor every rank agrees on."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes this process holds of weights and optimizer state (its shards under FSDP)."""
    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    total = sum(nbytes(p) for p in model.parameters())
    for per_param in optimizer.state.values():
        total += sum(nbytes(v) for v in per_param.values() if isinstance(v, torch.Tensor))
    return total


def gathered_weights(model: torch.nn.Module, trainable_only: bool) -> dict | None:
    """The sharded model's weights made whole on rank 0 (None on the others).

    Every rank must call it: gathering is collective. `trainable_only` gathers just
    what training changed (a LoRA adapter), not a frozen multi-GB base.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    if trainable_only:
        weights = {name: p.full_tensor().cpu() for name, p in model.named_parameters()
                   if p.requires_grad}
    else:
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                       cpu_offload=True))
    return weights if torch.distributed.get_rank() == 0 else None
