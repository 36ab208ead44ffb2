"""A checkpoint on its own: safe to load, verified before use, durable, and a failed save.

These drive core.checkpoint directly on a tiny model, so each case costs milliseconds;
tests/test_resume.py and tests/test_crash_safety.py prove the same through train_cls.py.
"""

import errno
import hashlib
import json
import os
import pickle
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from core import checkpoint, manifest, rng, sharded
from core.errors import UsageError


def draws() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(),
            torch.rand(3).tolist())


def test_rng_states_round_trip_through_the_safe_loader(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # both cache a second normal draw: it must survive
    torch.save(rng.state(), tmp_path / "rng.pt")
    expected = draws()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    rng.restore(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


# --- verification ---------------------------------------------------------------------------

def tiny():
    """(accelerator, model, optimizer) as the loop holds them, for a 2 x 2 linear layer."""
    model = torch.nn.Linear(2, 2)
    accelerator = Accelerator(cpu=True)
    return accelerator, *accelerator.prepare(model, torch.optim.AdamW(model.parameters()))


def save_steps(root: Path, *steps: int) -> None:
    """Checkpoints of a tiny model at `steps`, as the loop writes them."""
    accelerator, model, optimizer = tiny()
    for step in steps:
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        state = {"step": step, **checkpoint.identity(model), "plan": {}}
        checkpoint.save(root, step, accelerator, model, optimizer, state, keep=len(steps))


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "run"
    save_steps(out / "checkpoints", 3, 4)
    return out


@pytest.fixture
def run(two_checkpoints, tmp_path):
    """A fresh copy of a run directory holding checkpoints step-000003 and step-000004."""
    shutil.copytree(two_checkpoints, tmp_path / "run")
    return tmp_path / "run"


def newest(run: Path) -> Path:
    return run / "checkpoints" / "step-000004"


def test_the_manifest_lists_every_file_with_its_size_and_hash(run):
    path = newest(run)
    listed = json.loads((path / manifest.NAME).read_text())
    assert listed["format"] == manifest.FORMAT
    assert sorted(listed["files"]) == ["model.pt", "optimizer.pt", "rng_rank0.pt",
                                       "trainer_state.json"]
    for name, entry in listed["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest.problem(path) is None


def test_every_file_of_a_checkpoint_loads_with_the_safe_loader(run):
    """Issue #10, item 3: nothing in a checkpoint needs pickle (the FSDP layout is proven in
    tests/test_launch.py)."""
    for path in newest(run).iterdir():
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert path.suffix == ".pt", path
            torch.load(path, weights_only=True)


class RunsCode:
    """Unpickled, it would create `marker`: what a booby-trapped checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_file_that_would_run_code_is_refused_in_one_line(run, tmp_path):
    path, marker = newest(run), tmp_path / "code-ran"
    torch.save({"weight": RunsCode(marker)}, path / "model.pt")
    (path / manifest.NAME).write_text(json.dumps(manifest.describe(path)))  # signed over
    accelerator, model, optimizer = tiny()
    with pytest.raises(UsageError) as refused:
        checkpoint.load(checkpoint.resolve(str(path), run).path, accelerator, model, optimizer,
                        checkpoint.identity(model), {})
    assert str(refused.value) == (
        f"checkpoint {path} holds more than tensors and plain values: loading it would run "
        f"code it names — use only checkpoints rawtune wrote; this one was altered")
    assert not marker.exists()


def test_sharded_metadata_naming_code_is_refused_unrun(tmp_path):
    """DCP's own reader unpickles `.metadata` with pickle.load."""
    marker = tmp_path / "code-ran"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(pickle.UnpicklingError, match="system has no place in"):
        sharded.read_metadata(tmp_path)
    assert not marker.exists()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": truncate, "bit-flipped": flip_a_bit,
          "emptied": lambda path: path.write_bytes(b""), "deleted": Path.unlink}
FILES = ["model.pt", "optimizer.pt", "rng_rank0.pt", "trainer_state.json", manifest.NAME]


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("name", FILES)
def test_latest_skips_a_damaged_checkpoint_and_says_why(run, name, damage):
    DAMAGE[damage](newest(run) / name)
    found = checkpoint.resolve("latest", run)
    assert found.path == run / "checkpoints" / "step-000003"
    (line,) = found.skipped
    assert line.startswith(f"skipped checkpoint {newest(run)}: ")
    assert line.endswith(f"; resuming from {found.path}")
    if (name, damage) != (manifest.NAME, "bit-flipped"):  # a flip there may hit any entry
        assert name in line, line


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_checkpoint_named_explicitly_is_refused(run, name, damage):
    DAMAGE[damage](newest(run) / name)
    with pytest.raises(UsageError) as refused:
        checkpoint.resolve(str(newest(run)), run)
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"checkpoint {newest(run)} fails verification: ")
    assert f"resume from {run / 'checkpoints' / 'step-000003'}, the newest older checkpoint " \
           f"that verifies" in message


@pytest.mark.parametrize("change,why", [
    (lambda path: (path / "notes.txt").write_text("x"), "notes.txt, which its manifest does not list"),
    (lambda path: (path / manifest.NAME).write_text(json.dumps(
        {**json.loads((path / manifest.NAME).read_text()), "format": manifest.FORMAT + 1})),
     f"written by a newer rawtune (checkpoint format {manifest.FORMAT + 1}"),
    (lambda path: (path / manifest.NAME).unlink(), f"it has no {manifest.NAME}")])
def test_extra_files_newer_formats_and_missing_manifests_fail_verification(run, change, why):
    change(newest(run))
    assert why in manifest.problem(newest(run))
    with pytest.raises(UsageError, match="fails verification"):
        checkpoint.resolve(str(newest(run)), run)


def test_damage_after_a_verification_is_still_found(run):
    assert manifest.problem(newest(run)) is None
    time.sleep(0.01)  # a later modification time, even on coarse clocks
    flip_a_bit(newest(run) / "model.pt")
    assert "model.pt does not match its SHA-256" in manifest.problem(newest(run))


def test_with_no_checkpoint_that_verifies_resuming_is_refused(run):
    for step in ("step-000003", "step-000004"):
        truncate(run / "checkpoints" / step / "optimizer.pt")
    with pytest.raises(UsageError, match=r"no checkpoint in \S+ verifies \(step-000004: "
                                         r"optimizer.pt is \d+ bytes, its manifest says") as err:
        checkpoint.resolve("latest", run)
    assert "step-000003: optimizer.pt" in str(err.value)
    truncate(newest(run) / "model.pt")
    with pytest.raises(UsageError, match="no older checkpoint beside it verifies"):
        checkpoint.resolve(str(newest(run)), run)


# --- durable writes and failed saves ------------------------------------------------------

def test_every_file_and_directory_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    """Issue #10, item 2: a power loss must not leave a renamed but empty checkpoint."""
    events, real_fsync, real_rename = [], os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    root = tmp_path / "checkpoints"
    save_steps(root, 3)
    tmp, final = root / ".tmp-step-000003", root / "step-000003"
    renamed = events.index(("rename", str(tmp), str(final)))
    synced = {event[1] for event in events[:renamed] if event[0] == "fsync"}
    files = [str(tmp / name) for name in manifest.files(final) + [manifest.NAME]]
    assert set(files) | {str(tmp)} <= synced
    assert ("fsync", str(root)) in events[renamed:]  # the rename itself, made durable


def full_disk(monkeypatch, name: str) -> None:
    """Writing `name` fails half-way: a few bytes land, then ENOSPC."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if Path(getattr(f, "name", f)).name != name:
            return real(obj, f, *args, **kwargs)
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)


def failing_fsync(monkeypatch, name: str) -> None:
    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)


def no_permission(monkeypatch, name: str) -> None:
    def mkdir(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "mkdir", mkdir)


@pytest.mark.parametrize("inject,name,what", [
    (full_disk, "optimizer.pt", "No space left on device: {tmp}/optimizer.pt"),
    (full_disk, "rng_rank0.pt", "No space left on device: {tmp}/rng_rank0.pt"),
    (failing_fsync, "", "Input/output error: {tmp}/"),
    (no_permission, "", "Permission denied: {tmp}")], ids=["ENOSPC", "ENOSPC-rng", "EIO", "EACCES"])
def test_a_failed_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, inject, name, what):
    root = tmp_path / "checkpoints"
    save_steps(root, 3)
    inject(monkeypatch, name)
    with pytest.raises(checkpoint.SaveFailed) as failed:
        save_steps(root, 4)
    monkeypatch.undo()
    message, good, tmp = str(failed.value), root / "step-000003", root / ".tmp-step-000004"
    assert failed.value.code == 1 and len(message.splitlines()) == 1
    assert message.startswith("saving checkpoint step-000004 failed: " + what.format(tmp=tmp))
    assert f"the partial checkpoint was removed and the last good one, {good}, is kept" in message
    assert f"--resume-from latest --output-dir {tmp_path}" in message
    assert sorted(p.name for p in root.iterdir()) == ["step-000003"]  # no partial directory
    assert checkpoint.resolve("latest", tmp_path) == (good, [])
