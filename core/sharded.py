"""Under --fsdp: every rank's shards of the trainable weights and the optimizer state,
written and read by torch.distributed.checkpoint (DCP), without pickle.

DCP stores each tensor and each other value (the optimizer's param_groups) as a
`torch.save` blob inside its `.distcp` files, plus one `.metadata` file that says
where each blob lies. Its own reader unpickles `.metadata` with `pickle.load` and the
non-tensor blobs with `torch.load(weights_only=False)`: either runs whatever code a
file names. Here `.metadata` is read by an unpickler that builds DCP's metadata
classes and nothing else, and every blob loads with `weights_only=True`.
"""

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from core import durable

# What a DCP metadata file names: its own record classes, tensor sizes, dtypes and
# layouts, and the path it was saved to. Constructing any of them runs no user code.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's metadata")


def read_metadata(directory: Path) -> Metadata:
    """The `.metadata` of a DCP directory, read without running code it might name."""
    with (directory / ".metadata").open("rb") as f:
        return _MetadataUnpickler(f).load()


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path))
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as the stock reader does
        return metadata


class _SafePlanner(dcp.DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        """The stock planner's, with `weights_only=True`."""
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                        loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def save(directory: Path, model: torch.nn.Module, optimizer) -> None:
    """Each rank writes its shards of the trainable weights and the optimizer state;
    no rank ever holds them whole."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    weights, optim = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": trainable_only(model, weights), "optimizer": optim},
                 checkpoint_id=directory)
    except CheckpointException as err:
        # DCP raises it on every rank, holding each failed rank's error: a rank reports
        # its own only, as it would for any other file it failed to write.
        mine = err.failures.get(torch.distributed.get_rank())
        if mine is None:
            return
        if isinstance(mine[0], OSError):
            raise durable.naming(mine[0], directory) from None
        raise


def load(directory: Path, model: torch.nn.Module, optimizer) -> None:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_state_dict)
    weights, optim = get_state_dict(model, optimizer)  # the layout the shards load into
    state = {"model": trainable_only(model, weights), "optimizer": optim}
    dcp.load(state, storage_reader=_SafeReader(directory), planner=_SafePlanner())
    # strict=False: a LoRA checkpoint holds the adapters, not the frozen base.
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=StateDictOptions(strict=False))


def trainable_only(model: torch.nn.Module, weights: dict[str, Any]) -> dict[str, Any]:
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: w for name, w in weights.items() if name in trainable}


def weight_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Names and whole shapes of the trainable weights in a sharded checkpoint."""
    return {name: tuple(meta.size) for name, meta in _weight_entries(directory).items()}


def whole_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The trainable weights of a sharded checkpoint, whole, read by this process alone
    from every rank's shards: the start of a new run (--init-from), in any launch."""
    state = {"model": {name: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
                       for name, meta in _weight_entries(directory).items()}}
    with warnings.catch_warnings():  # DCP warns that no_dist loads alone: that is the point
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, storage_reader=_SafeReader(directory),
                 planner=_SafePlanner(allow_partial_load=True), no_dist=True)
    return state["model"]


def _weight_entries(directory: Path) -> dict[str, Any]:
    return {key[len("model."):]: meta
            for key, meta in read_metadata(directory).state_dict_metadata.items()
            if key.startswith("model.")}
