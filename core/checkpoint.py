"""Checkpoints that hold everything needed to continue, and survive anything mid-save.

A checkpoint is a directory `checkpoints/step-000123/` with the trainable weights,
the optimizer (and fp16 gradient scaler), the loop's counters and every rank's RNG
states. Under --fsdp the weights and optimizer state are written as each rank's
shards (`sharded/`, torch.distributed.checkpoint) instead of `model.pt`/`optimizer.pt`.

- Complete: it is written under a temporary name, every file and directory fsynced,
  and renamed into place. The rename is the commit point: a process killed or a
  machine losing power mid-save leaves the previous checkpoints intact and no
  half-written `step-*` directory behind.
- Verified: its manifest (core/manifest.py), written last, lists every file with its
  size and SHA-256; a resume uses only a checkpoint that matches it.
- Safe to load: nothing in it needs pickle. Weights, optimizer and scaler states and
  RNG states (core/rng.py) are tensors and plain containers, loaded with
  `weights_only=True`; the counters are JSON.
- A failed save (a full disk, an I/O error, a permission) on any rank ends the run on
  every rank with one line, after removing the partial directory.
"""

import hashlib
import json
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch

from core import durable, manifest, parallel, rng, sharded
from core.errors import UsageError, fail

PREFIX = "step-"
SHARDED = "sharded"  # under --fsdp: every rank's shards of weights and optimizer state
# What a checkpoint's weights are: their kind, the script that trains them, what it saves.
KINDS = {"full": ("a whole model's weights", "train_cls.py", "model/"),
         "lora": ("LoRA adapter weights", "train_lora.py", "adapter/")}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights training changes: all of them for full fine-tuning, the adapters for LoRA."""
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


class SaveFailed(UsageError):
    """A checkpoint could not be written: the run ends with one line and exit 1."""

    code = 1


class _Failed(Exception):
    """Some rank's part of a save failed; the text says what, where and on which rank."""


def save(ckpt_root: Path, step: int, accelerator, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` on all ranks; return its final path.

    Each part runs on every rank and ends in an exchange of errors, so a failure on
    any rank stops every rank at the same point (none waits for the others forever).
    """
    final = ckpt_root / f"{PREFIX}{step:06d}"
    tmp = ckpt_root / f".tmp-{final.name}"
    try:
        _on_every_rank(accelerator, lambda: _prepare(tmp, accelerator))
        if parallel.is_sharded(model):  # every rank writes its own shards
            _on_every_rank(accelerator,
                           lambda: sharded.save(tmp / SHARDED, model, optimizer.optimizer))
        _on_every_rank(accelerator, lambda: _write_files(tmp, accelerator, model, optimizer))
        _on_every_rank(accelerator, lambda: _commit(tmp, final, state, keep, accelerator))
    except _Failed as failed:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        good = complete_checkpoints(ckpt_root)
        raise SaveFailed(
            f"saving checkpoint {final.name} failed: {failed}; the partial checkpoint was "
            f"removed and " + (f"the last good one, {good[-1]}, is kept" if good else
                               "no earlier checkpoint exists")
            + f" — once {ckpt_root} has room and can be written, continue with the same "
            f"command and --resume-from latest --output-dir {ckpt_root.parent}"
        ) from None
    return final


def _on_every_rank(accelerator, part: Callable[[], None]) -> None:
    """Run this rank's `part` of a save; raise _Failed on every rank if it failed on any."""
    world = accelerator.num_processes
    where = f" (rank {accelerator.process_index})" if world > 1 else ""
    try:
        part()
        error = None
    except OSError as err:
        error = durable.describe(err) + where
    errors = [error]
    if world > 1:  # also the barrier between the parts
        from accelerate.utils import gather_object
        errors = gather_object(errors)
    if any(errors):
        raise _Failed(next(e for e in errors if e))


def _prepare(tmp: Path, accelerator) -> None:
    if accelerator.is_main_process:
        # Left-overs of saves that were killed half-way are incomplete by construction.
        for stale in tmp.parent.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)


def _write_files(tmp: Path, accelerator, model: torch.nn.Module, optimizer) -> None:
    """This rank's RNG states; on rank 0, the unsharded weights, optimizer and scaler."""
    def torch_save(name: str, obj: Any) -> None:
        durable.write(tmp / name, lambda f: torch.save(obj, f))

    # Each rank draws its own dropout masks, so each keeps its own RNG states.
    torch_save(f"rng_rank{accelerator.process_index}.pt", rng.state())
    if not accelerator.is_main_process:
        return
    if not parallel.is_sharded(model):
        torch_save("model.pt", trainable_state(accelerator.unwrap_model(model)))
        torch_save("optimizer.pt", optimizer.state_dict())
    if accelerator.scaler is not None:
        torch_save("scaler.pt", accelerator.scaler.state_dict())


def _commit(tmp: Path, final: Path, state: dict[str, Any], keep: int, accelerator) -> None:
    """Rank 0, once every rank's files are written: state, fsync, manifest, rename, prune."""
    if not accelerator.is_main_process:
        return
    durable.write(tmp / "trainer_state.json", lambda f: f.write(json.dumps(state, indent=2)
                                                                .encode()))
    # Written last: its presence marks every other file as complete, its hashes as intact.
    described = manifest.describe(tmp)
    durable.write(tmp / manifest.NAME, lambda f: f.write(json.dumps(described, indent=1)
                                                         .encode()))
    durable.fsync_tree(tmp)  # every rank's files: on disk before the rename commits them
    if final.exists():  # the same step saved again (a resumed run stopped at once)
        old = final.parent / f".tmp-old-{final.name}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    durable.fsync(final.parent)  # the rename itself
    # Checkpoints past this step belong to a future this run abandoned by resuming
    # from an earlier one: left there, `latest` would go back to them.
    step, saved = step_of(final), complete_checkpoints(final.parent)
    for old in [p for p in saved if step_of(p) > step] + \
            [p for p in saved if step_of(p) <= step][:-keep]:
        shutil.rmtree(old)


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


def kind(model: torch.nn.Module) -> str:
    """"lora" for a peft model (its adapters alone train), "full" otherwise."""
    return "lora" if hasattr(model, "peft_config") else "full"


def identity(model: torch.nn.Module) -> dict[str, str]:
    """What a checkpoint of `model` records to refuse being loaded into another model."""
    return {"fingerprint": fingerprint(model), "kind": kind(model)}


def check_fits(path: Path, model_identity: dict[str, str]) -> dict[str, Any]:
    """The loop state of checkpoint `path`, if it was saved from a model like this one."""
    state = json.loads((path / "trainer_state.json").read_text())
    theirs, ours = state.get("kind"), model_identity["kind"]
    if theirs in KINDS and theirs != ours:
        raise fail(f"checkpoint {path} holds {KINDS[theirs][0]}, from a {KINDS[theirs][1]} run",
                   f"resume it with {KINDS[theirs][1]}, or pass a checkpoint of a "
                   f"{KINDS[ours][1]} run")
    if state.get("fingerprint") != model_identity["fingerprint"]:
        raise fail(f"checkpoint {path} belongs to another model or task",
                   "resume with the same --model and trainable settings as the original run")
    return state


def load(path: Path, accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         model_identity: dict[str, str], plan: dict[str, Any]) -> dict[str, Any]:
    """Restore weights, optimizer, scaler and this rank's RNG; return the loop state.

    `plan` holds what fixes the lr schedule and the batches (total steps, world
    size, batch size, ...): a run resumed under another plan would silently train
    on a different schedule and data order, so it is refused, pointing to
    --init-from, which starts a new run from the checkpoint's weights instead.
    """
    state = check_fits(path, model_identity)
    saved = state.get("plan", {})
    changed = [k for k in plan if k in saved and saved[k] != plan[k]]
    if changed:
        raise fail(f"checkpoint {path} was made by a run with "
                   + ", ".join(f"{k}={saved[k]}" for k in changed) + "; this run has "
                   + ", ".join(f"{k}={plan[k]}" for k in changed),
                   "resume with the original run's settings, data and tokenizer (see its "
                   "config.json)" + _layout_hint(saved, changed) + f"; or go on under this "
                   f"plan as a new run from its weights: --init-from {path} and a new "
                   f"--output-dir, without --resume-from")
    with safely_loaded(path):
        _restore(path, accelerator, model, optimizer)
    return state


@contextmanager
def safely_loaded(path: Path) -> Iterator[None]:
    """The safe loaders refuse anything but tensors and plain values: say so in one line."""
    try:
        yield
    except pickle.UnpicklingError:
        raise fail(f"checkpoint {path} holds more than tensors and plain values: loading it "
                   f"would run code it names", "use only checkpoints rawtune wrote; this one "
                   "was altered") from None


def _restore(path: Path, accelerator, model: torch.nn.Module, optimizer) -> None:
    if parallel.is_sharded(model):
        sharded.load(path / SHARDED, model, optimizer.optimizer)
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
