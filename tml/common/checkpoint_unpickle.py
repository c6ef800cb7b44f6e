"""The one restricted unpickler for everything pickled inside a checkpoint.

Why: a checkpoint directory is a file a user may have been given. DCP pickles its
`.metadata` (and each tensor record of a `.distcp` file holds a small `data.pkl`); plain
`pickle.load` of such a file runs whatever the file says (a `__reduce__` calling
`os.system`). Every reader of those pickles in tml goes through `restricted_load`:

- Only the exact (module, qualified name) pairs of an allow-list resolve; the value is taken
  from the list itself, never looked up by name. So no dotted names (protocol 4's
  `STACK_GLOBAL 'torch.distributed.checkpoint.metadata' 'os.system'` walks from a module
  to anything it imports), no module objects, no module walking, no builtins.
- `METADATA_GLOBALS` is what DCP's `Metadata` of the checkpoints tml writes needs in torch
  2.13, read off real checkpoints of every layout and optimizer the project writes
  (tests/checkpoint_checks.py records the names each `.metadata` refers to and checks them
  against this list). A REDUCE/NEWOBJ of an allowed class only calls that class's own
  constructor (dataclasses, `torch.Size`, an Enum, `pathlib.PosixPath`), none of which
  reaches code chosen by the file; the result is then checked for shape by the caller.
- Any failure (a refused name, truncated or garbled bytes, a constructor's TypeError,
  deep nesting) becomes `CheckpointError` with one line naming the file.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint import filesystem as _dcp_filesystem
from torch.distributed.checkpoint import metadata as _dcp_metadata

from tml.errors import CheckpointError


def _torch_constants() -> dict[tuple[str, str], Any]:
    """Every dtype, layout and memory format, under the name pickle gives it ('torch', 'float32')."""
    found: dict[tuple[str, str], Any] = {}
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)) \
                and str(value) == f"torch.{name}":
            found[("torch", name)] = value
    return found


# What the `.metadata` of a DCP checkpoint refers to (torch 2.13, FileSystemWriter).
METADATA_GLOBALS: Mapping[tuple[str, str], Any] = {
    ("torch.distributed.checkpoint.metadata", "Metadata"): _dcp_metadata.Metadata,
    ("torch.distributed.checkpoint.metadata", "StorageMeta"): _dcp_metadata.StorageMeta,
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"): _dcp_metadata.MetadataIndex,
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"):
        _dcp_metadata.TensorStorageMetadata,
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"):
        _dcp_metadata.BytesStorageMetadata,
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"):
        _dcp_metadata.ChunkStorageMetadata,
    ("torch.distributed.checkpoint.metadata", "TensorProperties"):
        _dcp_metadata.TensorProperties,
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"):
        _dcp_metadata._MEM_FORMAT_ENCODING,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _dcp_filesystem._StorageInfo,
    ("torch", "Size"): torch.Size,
    # A layout is pickled as _get_layout('torch.strided'): a lookup in torch's own table.
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    # StorageMeta.checkpoint_id: the path the checkpoint was written to.
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    **_torch_constants(),
}


def storage_globals() -> dict[tuple[str, str], Any]:
    """The typed storage classes a `torch.save`d tensor record names ('torch', 'FloatStorage')."""
    return {("torch", name): getattr(torch, name) for name in dir(torch)
            if name.endswith("Storage") and isinstance(getattr(torch, name), type)
            and issubclass(getattr(torch, name), (torch.storage.TypedStorage,
                                                  torch.UntypedStorage))}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the exact (module, name) pairs of `allowed`.

    `persistent_load`: the handler of persistent ids (tensor records name their storage
    that way); without one, a persistent id is refused.
    """

    def __init__(self, file: BinaryIO, allowed: Mapping[tuple[str, str], Any],
                 persistent_load: Callable[[Any], Any] | None = None) -> None:
        super().__init__(file)
        self._allowed = allowed
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in self._allowed:    # exact pair: no dotted walk, no getattr by name
            return self._allowed[key]
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a checkpoint never "
                                     "contains")

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise pickle.UnpicklingError("holds a persistent id, which it never contains")
        return self._persistent(pid)


def restricted_load(source: bytes | BinaryIO, allowed: Mapping[tuple[str, str], Any],
                    what: str, persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """Unpickle `source` with `RestrictedUnpickler`; CheckpointError naming `what` if it fails.

    Everything a damaged or hostile file can make the unpickler raise (refused names,
    truncation, garbage opcodes, constructor errors, memory or recursion exhaustion)
    becomes one line.
    """
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        return RestrictedUnpickler(stream, allowed, persistent_load).load()
    except CheckpointError:
        raise
    except (Exception, RecursionError, MemoryError) as error:  # noqa: BLE001 (hostile bytes)
        text = " ".join(str(error).split())[:200]
        raise CheckpointError(f"{what} is damaged or not a checkpoint file: cannot unpickle it "
                              f"({type(error).__name__}: {text})") from None
