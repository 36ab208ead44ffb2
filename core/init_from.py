"""--init-from: a new run whose trainable weights start where an earlier run's ended.

The weights come from one of the earlier run's checkpoints (`RUN/checkpoints/step-N`,
verified against its manifest first) or from what it saved at its end: train_cls.py's
`model/`, train_lora.py's `r{R}/adapter/`. Only the weights carry over. The optimizer,
the lr schedule and the counters start fresh under the new run's own plan, which is
what a resume cannot do: more epochs, another learning rate, another launch.

The source must fit: weights of the same kind (a whole model, or LoRA adapters), every
trainable weight of the new model there with the same shape, and nothing else. The
scripts check that on a weightless (meta) copy of the model before anything is written
(`check`); the loop then copies the weights in (`load`).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from core import checkpoint, manifest, sharded
from core.errors import fail

ADAPTER = "default"  # the name peft gives a model's one adapter, and leaves out of saved files
DORA_MAGNITUDE = ".lora_magnitude_vector.weight"


@dataclass
class _Source:
    kind: str | None                          # as checkpoint.KINDS; None: not recorded
    shapes: dict[str, tuple[int, ...]]        # stored names -> shapes
    read: Callable[[], dict[str, torch.Tensor]]
    peft_names: bool = False                  # named as peft saves adapters (no ".default")


def check(spec: str, model: torch.nn.Module) -> None:
    """Refuse, in one line, weights that do not fit `model`."""
    _match(spec, _open(spec), model)


def load(model: torch.nn.Module, spec: str) -> None:
    """Copy the weights of `spec` into `model`'s trainable weights."""
    source = _open(spec)
    names = _match(spec, source, model)
    with checkpoint.safely_loaded(Path(spec)):
        stored = source.read()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, stored_name in names.items():
            params[name].copy_(stored[stored_name])


def _open(spec: str) -> _Source:
    path = Path(spec)
    if (path / manifest.NAME).is_file() or (path / "trainer_state.json").is_file():
        return _checkpoint(path)
    if (path / "adapter_config.json").is_file():
        return _safetensors("lora", path, [path / "adapter_model.safetensors"], peft_names=True)
    if (path / "config.json").is_file():
        index = path / "model.safetensors.index.json"
        files = ({path / name for name in json.loads(index.read_text())["weight_map"].values()}
                 if index.is_file() else [path / "model.safetensors"])
        return _safetensors("full", path, sorted(files))
    raise fail(f"--init-from {spec} is neither a checkpoint (RUN/checkpoints/step-N) nor a "
               f"saved model/ or adapter/ directory", "pass one of those from an earlier run")


def _checkpoint(path: Path) -> _Source:
    why = manifest.problem(path)
    if why:
        raise fail(f"--init-from {path} fails verification: {why}",
                   "pass a checkpoint that verifies (an older step-N beside it) or the run's "
                   "saved model/ or adapter/")
    kind = json.loads((path / "trainer_state.json").read_text()).get("kind")
    shards = path / checkpoint.SHARDED
    with checkpoint.safely_loaded(path):
        if shards.is_dir():
            return _Source(kind, sharded.weight_shapes(shards),
                           lambda: sharded.whole_weights(shards))
        weights = torch.load(path / "model.pt", weights_only=True, mmap=True)
    return _Source(kind, {name: tuple(t.shape) for name, t in weights.items()}, lambda: weights)


def _safetensors(kind: str, path: Path, files: list[Path], peft_names: bool = False) -> _Source:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file
    shapes = {}
    try:
        for file in files:
            with safe_open(file, "pt") as f:
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    except (OSError, SafetensorError) as err:
        raise fail(f"--init-from {path}: cannot read {file.name} ({err})",
                   "pass a model/ or adapter/ directory as rawtune saved it") from None
    return _Source(kind, shapes, lambda: {name: tensor for file in files
                                          for name, tensor in load_file(file).items()},
                   peft_names)


def _match(spec: str, source: _Source, model: torch.nn.Module) -> dict[str, str]:
    """Each trainable weight's name in the source; refuse a source that does not fit."""
    kind = checkpoint.kind(model)
    if source.kind in checkpoint.KINDS and source.kind != kind:
        what, script, _ = checkpoint.KINDS[source.kind]
        raise fail(f"--init-from {spec} holds {what}, from a {script} run",
                   f"pass a checkpoint or the {checkpoint.KINDS[kind][2]} of a "
                   f"{checkpoint.KINDS[kind][1]} run")

    def stored(name: str) -> str:
        if not source.peft_names:
            return name
        name = name.replace(f".{ADAPTER}", "")
        # DoRA's magnitudes are a module's weight in the model; peft saves them under
        # the module's name.
        return name.removesuffix(".weight") if name.endswith(DORA_MAGNITUDE) else name

    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n in trainable if stored(n) not in source.shapes]
    differ = [n for n in trainable if source.shapes.get(stored(n), trainable[n]) != trainable[n]]
    known = {stored(n) for n in model.state_dict()}
    extra = [n for n in source.shapes if n not in known]
    if differ and kind == "lora":
        _refuse_rank(spec, source.shapes, trainable)
    if missing or differ or extra:
        parts = [f"{len(missing)} of this model's trainable weights are not there "
                 f"(e.g. {missing[0]})"] if missing else []
        parts += [f"{len(differ)} differ in shape (e.g. {differ[0]}: "
                  f"{source.shapes[stored(differ[0])]} there, {trainable[differ[0]]} here)"
                  ] if differ else []
        parts += [f"it holds {len(extra)} weights this model lacks (e.g. {extra[0]})"
                  ] if extra else []
        raise fail(f"--init-from {spec} does not fit this model: " + "; ".join(parts),
                   "start from weights of the same architecture (the same --model, labels "
                   "and, for LoRA, --target-modules)")
    return {n: stored(n) for n in trainable}


def _refuse_rank(spec: str, stored: dict, trainable: dict) -> None:
    """A LoRA rank that differs is the likely mismatch: name it, if it is the one."""
    def rank(shapes: dict) -> int:
        return next(shape[0] for name, shape in sorted(shapes.items()) if ".lora_A." in name)

    theirs, mine = rank(stored), rank(trainable)
    if theirs != mine:
        raise fail(f"--init-from {spec} holds rank-{theirs} adapters, which cannot start a "
                   f"rank-{mine} one (--lora-r {mine})",
                   f"pass --lora-r {theirs} alone, or an adapter of rank {mine}")
