"""Checkpoints that hold everything needed to continue, and survive a crash mid-save.

A checkpoint is a directory `checkpoints/step-000123/` with the trainable weights,
the optimizer (and fp16 gradient scaler), the loop's counters and every rank's RNG
states. Under --fsdp the weights and optimizer state are written as each rank's
shards (`sharded/`, torch.distributed.checkpoint) instead of `model.pt`/`optimizer.pt`. It is written under a temporary name and renamed into place: rename is
atomic, so a process killed while saving leaves the previous checkpoints intact
and no half-written `step-*` directory behind.
"""

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from core import manifest, parallel, rng
from core.errors import fail

PREFIX = "step-"
SHARDED = "sharded"  # under --fsdp: every rank's shards of weights and optimizer state


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights training changes: all of them for full fine-tuning, the adapters for LoRA."""
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


def save(ckpt_root: Path, step: int, accelerator, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` atomically on all ranks; returns its final path."""
    final = ckpt_root / f"{PREFIX}{step:06d}"
    tmp = ckpt_root / f".tmp-{PREFIX}{step:06d}"
    if accelerator.is_main_process:
        # Left-overs of saves that were killed half-way are incomplete by construction.
        for stale in ckpt_root.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # Each rank draws its own dropout masks, so each keeps its own RNG states.
    torch.save(rng.state(), tmp / f"rng_rank{accelerator.process_index}.pt")
    if parallel.is_sharded(model):  # every rank writes its own shards
        _save_sharded(tmp / SHARDED, model, optimizer.optimizer)
    elif accelerator.is_main_process:
        torch.save(trainable_state(accelerator.unwrap_model(model)), tmp / "model.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if accelerator.is_main_process and accelerator.scaler is not None:
        torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        # Written last: its presence marks every other file as complete, its hashes as intact.
        (tmp / manifest.NAME).write_text(json.dumps(manifest.describe(tmp), indent=1))
        if final.exists():  # the same step saved again (a resumed run stopped at once)
            old = ckpt_root / f".tmp-old-{final.name}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        # Checkpoints past this step belong to a future this run abandoned by resuming
        # from an earlier one: left there, `latest` would go back to them.
        saved = complete_checkpoints(ckpt_root)
        for old in [p for p in saved if step_of(p) > step] + \
                [p for p in saved if step_of(p) <= step][:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def _is_step(path: Path) -> bool:
    return path.name.startswith(PREFIX) and path.name[len(PREFIX):].isdigit()


def _step_dirs(ckpt_root: Path) -> list[Path]:
    """Every `step-N` directory, oldest first, whole or not."""
    return sorted(filter(_is_step, ckpt_root.glob(f"{PREFIX}*")), key=step_of)


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """`step-N` directories holding a manifest (written last), oldest first."""
    return [p for p in _step_dirs(ckpt_root) if (p / manifest.NAME).is_file()]


class Resolved(NamedTuple):
    path: Path          # the checkpoint to resume from: it verifies
    skipped: list[str]  # one line per newer checkpoint that does not, saying why


def resolve(resume_from: str, output_dir: Path) -> Resolved:
    """`latest` → the newest checkpoint of this output dir that verifies; else a given
    path, which must verify. Bad input is refused in one line, naming what does verify."""
    if resume_from == "latest":
        return _newest_verified(output_dir / "checkpoints")
    path = Path(resume_from)
    if not ((path / manifest.NAME).is_file() or (path / "trainer_state.json").is_file()):
        raise fail(f"{resume_from} is not a checkpoint (no {manifest.NAME})",
                   "pass a checkpoints/step-N directory or 'latest'")
    why = manifest.problem(path)
    if why is None:
        return Resolved(path, [])
    older = [p for p in _step_dirs(path.parent)[::-1] if step_of(p) < step_of(path)] \
        if _is_step(path) else []
    good = next((p for p in older if manifest.problem(p) is None), None)
    raise fail(f"checkpoint {path} fails verification: {why}",
               f"resume from {good}, the newest older checkpoint that verifies" if good
               else "no older checkpoint beside it verifies: start the run over without "
                    "--resume-from")


def _newest_verified(ckpt_root: Path) -> Resolved:
    found = _step_dirs(ckpt_root)[::-1]
    if not found:
        raise fail(f"no checkpoint to resume from in {ckpt_root}",
                   "drop --resume-from, or point --output-dir at the interrupted run")
    problems = []
    for path in found:
        why = manifest.problem(path)
        if why is None:
            return Resolved(path, [f"skipped checkpoint {bad}: {bad_why}; resuming from {path}"
                                   for bad, bad_why in problems])
        problems.append((path, why))
    raise fail(f"no checkpoint in {ckpt_root} verifies ("
               + "; ".join(f"{bad.name}: {bad_why}" for bad, bad_why in problems) + ")",
               "start the run over without --resume-from, or restore the checkpoints "
               "from a copy")


def load(path: Path, accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         fingerprint: str, plan: dict[str, Any]) -> dict[str, Any]:
    """Restore weights, optimizer, scaler and this rank's RNG; return the loop state.

    `plan` holds what fixes the lr schedule and the batches (total steps, world
    size, batch size, ...): a run resumed under another plan would silently train
    on a different schedule and data order, so it is refused.
    """
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("fingerprint") != fingerprint:
        raise fail(f"checkpoint {path} belongs to another model or task",
                   "resume with the same --model and trainable settings as the original run")
    saved = state.get("plan", {})
    changed = [k for k in plan if k in saved and saved[k] != plan[k]]
    if changed:
        raise fail(f"checkpoint {path} was made by a run with "
                   + ", ".join(f"{k}={saved[k]}" for k in changed) + "; this run has "
                   + ", ".join(f"{k}={plan[k]}" for k in changed),
                   "resume with the original run's settings, data and tokenizer (see its "
                   "config.json)" + _layout_hint(saved, changed))
    if parallel.is_sharded(model):
        _load_sharded(path / SHARDED, model, optimizer.optimizer)
    else:
        weights = torch.load(path / "model.pt", weights_only=True)
        params = dict(accelerator.unwrap_model(model).named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rng.restore(torch.load(path / f"rng_rank{accelerator.process_index}.pt", weights_only=True))
    return state


def _layout_hint(saved: dict[str, Any], changed: list[str]) -> str:
    """How to launch a resume of a checkpoint written by another number of processes or
    another sharding: its batch layout and (under FSDP) its shards follow from both."""
    hint = ""
    if "world_size" in changed:
        hint += (f", launched as {saved['world_size']} process(es) (torchrun --nproc_per_node "
                 f"{saved['world_size']})")
    if "fsdp" in changed:
        hint += ", with --fsdp" if saved["fsdp"] else ", without --fsdp"
    return hint


def _save_sharded(directory: Path, model: torch.nn.Module, optimizer) -> None:
    """Each rank writes its shards of the trainable weights and the optimizer state
    (torch.distributed.checkpoint); no rank ever holds them whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    weights, optim = get_state_dict(model, optimizer)
    dcp.save({"model": _trainable_only(model, weights), "optimizer": optim},
             checkpoint_id=directory)


def _load_sharded(directory: Path, model: torch.nn.Module, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_state_dict)
    weights, optim = get_state_dict(model, optimizer)  # the layout the shards load into
    state = {"model": _trainable_only(model, weights), "optimizer": optim}
    dcp.load(state, checkpoint_id=directory)
    # strict=False: a LoRA checkpoint holds the adapters, not the frozen base.
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=StateDictOptions(strict=False))


def _trainable_only(model: torch.nn.Module, weights: dict[str, Any]) -> dict[str, Any]:
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: w for name, w in weights.items() if name in trainable}


def data_fingerprint(rows) -> str:
    """A hash of the tokenised training rows (ids and labels): a resumed run must see the
    same data, tokenised the same way, for its skipped batches to be the ones done."""
    digest = hashlib.sha256()
    for row in rows:
        # Segment ids only where rows have them, so older checkpoints keep their fingerprint.
        for key in ("input_ids", "labels") + (("token_type_ids",) if "token_type_ids" in row
                                               else ()):
            digest.update(np.asarray(row.get(key, -1), dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()[:16]


def fingerprint(model: torch.nn.Module) -> str:
    """Names and shapes of the trainable weights: enough to refuse a foreign checkpoint."""
    names = ";".join(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters()
                     if p.requires_grad)
    return hashlib.sha256(names.encode()).hexdigest()[:16]
