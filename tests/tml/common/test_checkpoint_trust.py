"""Checkpoints from someone else: hostile pickles, changed bytes, torn copies.

Every attack is made for real on a checkpoint this process saved: the `.metadata` is
replaced by a pickle that would run a command (touching a marker file) if it were
unpickled with `pickle.load`, and, so that the unpickler itself is what stops it, its
recorded checksum is forged to match. Each test checks that the marker was not created and
that the error is one line naming the file.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import struct
import time
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given
from hypothesis import strategies as st
from torch.distributed.checkpoint.api import CheckpointException

from tests.fuzz_support import FUZZ_SETTINGS, mutated, outcome
from tml.common.checkpoint_integrity import CHECKSUMS_FILE, file_sha256
from tml.common.checkpoint_rows import load_rows, tensor_shapes
from tml.common.checkpoint_unpickle import METADATA_GLOBALS, restricted_load
from tml.common.checkpointing import (
    SafeFileSystemReader,
    latest_checkpoint,
    load_checkpoint,
    read_metadata,
    read_tensors,
    save_checkpoint,
    verify_checkpoint,
)
from tml.errors import CheckpointError


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(50, 8)
        self.dense = torch.nn.Linear(8, 2)


class _OptimizerState:
    """A part with optimizer-like state (Adagrad's sums, SGD's momentum buffers)."""

    def __init__(self, model: torch.nn.Module, kind: str) -> None:
        params = list(model.parameters())
        self.optimizer = (torch.optim.Adagrad(params, lr=0.1) if kind == "adagrad"
                          else torch.optim.SGD(params, lr=0.1, momentum=0.9))
        for p in params:
            p.grad = torch.ones_like(p)
        self.optimizer.step()

    def state_dict(self):
        return {str(i): dict(s) for i, s in enumerate(self.optimizer.state.values())}

    def load_state_dict(self, state):
        pass


def _save(save_dir, step=1, kind="adagrad"):
    model = _Model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return save_checkpoint(str(save_dir), step, {"model": model,
                                                      "optim": _OptimizerState(model, kind)})


def _forge_checksum(path, name):
    """What an attacker who rewrote `name` does next: record its new sha256."""
    record = os.path.join(path, CHECKSUMS_FILE)
    data = json.load(open(record))
    file = os.path.join(path, name)
    data["files"][name] = {"bytes": os.path.getsize(file), "sha256": file_sha256(file)}
    json.dump(data, open(record, "w"))


def _replace_metadata(path, payload: bytes):
    with open(os.path.join(path, ".metadata"), "wb") as f:
        f.write(payload)
    _forge_checksum(path, ".metadata")


# --- gadgets: pickles that run `touch MARKER` when unpickled with pickle.load ----------

def _unicode(text: str) -> bytes:
    data = text.encode()
    return (b"\x8c" + bytes([len(data)]) + data if len(data) < 256
            else b"X" + struct.pack("<I", len(data)) + data)


def _stack_global_call(module: str, name: str, *args: object) -> bytes:
    """Protocol 4: STACK_GLOBAL module name (dotted names walk attributes), REDUCE(args)."""
    return (b"\x80\x04" + _unicode(module) + _unicode(name) + b"\x93"
            + pickle.dumps(tuple(args), protocol=4)[2:-1] + b"R.")


def _global_call(module: str, name: str, *args: object) -> bytes:
    """GLOBAL "module\\nname\\n" (protocol 4: dotted names walk too), REDUCE(args)."""
    return (b"\x80\x04c" + module.encode() + b"\n" + name.encode() + b"\n"
            + pickle.dumps(tuple(args), protocol=4)[2:-1] + b"R.")


class _Reduce:
    """A `__reduce__` gadget, pickled the ordinary way."""

    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _gadgets(marker: str) -> dict[str, bytes]:
    command = f"touch {marker}"
    import subprocess

    return {
        "os.system via a DCP module's dotted name":
            _stack_global_call("torch.distributed.checkpoint.metadata", "os.system", command),
        "os.system via the filesystem module":
            _stack_global_call("torch.distributed.checkpoint.filesystem", "os.system", command),
        "os.system via torch.serialization (GLOBAL, dotted)":
            _global_call("torch.serialization", "os.system", command),
        "a walk through torch's own submodules":
            _stack_global_call("torch", "distributed.checkpoint.metadata.os.system", command),
        "an allowed module then a dotted walk":
            _stack_global_call("torch.distributed.checkpoint.metadata",
                               "torch.serialization.os.system", command),
        "builtins eval": _global_call("builtins", "eval",
                                      f"__import__('os').system({command!r})"),
        "builtins exec": _stack_global_call("builtins", "exec",
                                            f"import os; os.system({command!r})"),
        "subprocess.Popen": _global_call("subprocess", "Popen", ["touch", marker]),
        "a __reduce__ gadget (posix.system)": pickle.dumps(_Reduce(os.system, (command,))),
        "a __reduce__ gadget (subprocess.call)":
            pickle.dumps(_Reduce(subprocess.call, (["touch", marker],))),
        "a module object as a global":
            _stack_global_call("torch.distributed.checkpoint", "metadata"),
        "the os module from a DCP module":
            b"\x80\x04" + _unicode("torch.distributed.checkpoint.metadata") + _unicode("os")
            + b"\x93.",
        "a persistent id": b"\x80\x04" + _unicode(command) + b"\x94.",
        "REDUCE of an allowed class with hostile args":
            _stack_global_call("torch.serialization", "_get_layout", command),
        "an allowed dataclass built with a hostile state":
            _stack_global_call("torch.distributed.checkpoint.metadata", "Metadata", command),
    }


GADGET_NAMES = list(_gadgets("/x"))


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message, repr(message)
    return message


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("pristine")
    return _save(save_dir)


@pytest.fixture
def checkpoint(pristine, tmp_path):
    import shutil

    copy = tmp_path / "save" / "1"
    shutil.copytree(pristine, copy)
    return str(copy)


@pytest.mark.parametrize("gadget", GADGET_NAMES)
def test_hostile_metadata_runs_nothing_and_is_one_line_naming_the_file(checkpoint, tmp_path,
                                                                      gadget):
    marker = tmp_path / "pwned"
    _replace_metadata(checkpoint, _gadgets(str(marker))[gadget])
    metadata_file = os.path.join(checkpoint, ".metadata")
    readers = {
        "read_metadata": lambda: read_metadata(checkpoint),
        "load_checkpoint (resume)": lambda: load_checkpoint(checkpoint, {"model": _Model()}),
        "read_tensors": lambda: read_tensors(checkpoint),
        "tensor_shapes (export/evaluate)": lambda: tensor_shapes(checkpoint),
        "load_rows (export/evaluate)": lambda: load_rows(checkpoint, "model.table.weight", 0, 2),
    }
    for name, read in readers.items():
        with pytest.raises(CheckpointError) as error:
            read()
        assert metadata_file in _one_line(error.value), (name, str(error.value))
        assert not marker.exists(), (gadget, name)
    # DCP's own load, given our reader, reads .metadata through it (DCP wraps the error).
    with pytest.raises(CheckpointException) as wrapped:
        dcp.load({"model.table.weight": torch.empty(50, 8)},
                 storage_reader=SafeFileSystemReader(checkpoint), no_dist=True)
    assert metadata_file in str(wrapped.value)
    assert not marker.exists()
    # Resume: the hostile checkpoint is skipped (named), none other is intact.
    with pytest.raises(CheckpointError, match="no intact checkpoint in") as error:
        latest_checkpoint(os.path.dirname(checkpoint))
    assert metadata_file in _one_line(error.value)
    assert not marker.exists()


def test_the_gadgets_are_real(tmp_path):
    """Each code-running gadget does run its command under plain pickle.load."""
    marker = tmp_path / "pwned"
    runners = [n for n in GADGET_NAMES
               if not any(k in n for k in ("module object", "the os module", "persistent",
                                           "allowed"))]
    for name in runners:
        try:
            pickle.loads(_gadgets(str(marker))[name])
        except Exception:  # noqa: BLE001 (eval/exec/Popen return odd things; ran anyway)
            pass
        deadline = time.monotonic() + 5
        while not marker.exists() and time.monotonic() < deadline:   # Popen is asynchronous
            time.sleep(0.01)
        assert marker.exists(), name
        marker.unlink()


def test_metadata_allowlist_is_exact_names_only():
    assert all("." not in name for _, name in METADATA_GLOBALS)
    for module, name in (("torch.distributed.checkpoint.metadata", "os"),
                         ("torch.distributed.checkpoint.metadata", "torch"),
                         ("torch", "load"), ("torch", "serialization"),
                         ("builtins", "getattr"), ("builtins", "dict")):
        with pytest.raises(CheckpointError, match=f"refers to {module}.{name}"):
            restricted_load(_stack_global_call(module, name), METADATA_GLOBALS, "f")


def _real_metadata(checkpoint):
    return read_metadata(checkpoint)


def test_allowed_classes_with_hostile_contents_are_refused(checkpoint, tmp_path):
    """Well-formed pickles of the real classes, built to escape or mislead later code."""
    metadata_file = os.path.join(checkpoint, ".metadata")
    cases = []
    outside = _real_metadata(checkpoint)
    for info in outside.storage_data.values():
        info.relative_path = "../../outside.distcp"
    cases.append((outside, "names a file outside the checkpoint"))
    absolute = _real_metadata(checkpoint)
    for info in absolute.storage_data.values():
        info.relative_path = "/etc/passwd"
    cases.append((absolute, "names a file outside the checkpoint"))
    transformed = _real_metadata(checkpoint)
    for info in transformed.storage_data.values():
        info.transform_descriptors = ["zstd"]
    cases.append((transformed, "which tml never writes"))
    wrong = _real_metadata(checkpoint)
    wrong.state_dict_metadata = "not a table"
    cases.append((wrong, "its tensor or storage table is missing"))
    chunk = _real_metadata(checkpoint)
    entry = chunk.state_dict_metadata["model.table.weight"]
    entry.chunks[0].sizes = torch.Size([10_000, 8])
    cases.append((chunk, "outside the tensor"))
    for metadata, message in cases:
        _replace_metadata(checkpoint, pickle.dumps(metadata))
        for read in (lambda: read_metadata(checkpoint),
                     lambda: load_rows(checkpoint, "model.table.weight", 0, 2)):
            with pytest.raises(CheckpointError, match=message) as error:
                read()
            assert metadata_file in _one_line(error.value)


def test_pickled_bytes_in_a_distcp_are_never_unpickled(checkpoint, tmp_path):
    """A .distcp byte payload (DCP's planner would torch.load(weights_only=False) it) with
    metadata that declares the table as bytes: refused, not unpickled."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(_Reduce(os.system, (f"touch {marker}",)), payload)
    data_file = os.path.join(checkpoint, "__0_0.distcp")
    with open(data_file, "ab") as f:
        offset = f.tell()
        f.write(payload.getvalue())
    _forge_checksum(checkpoint, "__0_0.distcp")
    metadata = _real_metadata(checkpoint)
    key = "model.table.weight"
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    index = next(i for i in metadata.storage_data if i.fqn == key)
    info = metadata.storage_data.pop(index)
    info.offset, info.length = offset, len(payload.getvalue())
    from torch.distributed.checkpoint.metadata import MetadataIndex

    metadata.storage_data[MetadataIndex(key)] = info
    _replace_metadata(checkpoint, pickle.dumps(metadata))
    attempts = {
        "load_checkpoint": (lambda: load_checkpoint(checkpoint, {"model": _Model()}),
                            f"checkpoint {checkpoint} has no tensor '{key}'"),
        "DCP with our reader": (lambda: dcp.load(
            {key: torch.empty(50, 8)}, storage_reader=SafeFileSystemReader(checkpoint),
            no_dist=True), "stored as pickled bytes in __0_0.distcp"),
        "DCP with our reader, non-tensor target": (lambda: dcp.load(
            {key: "anything"}, storage_reader=SafeFileSystemReader(checkpoint),
            no_dist=True), "stored as pickled bytes in __0_0.distcp"),
        "load_rows": (lambda: load_rows(checkpoint, key, 0, 1), "has no tensor"),
    }
    for name, (read, message) in attempts.items():
        with pytest.raises(BaseException) as error:
            read()
        assert message in str(error.value), (name, str(error.value)[:500])
        assert not marker.exists(), name


# --- changed bytes (checksums) -----------------------------------------------------------

def _flip(path, name, at=None):
    file = os.path.join(path, name)
    size = os.path.getsize(file)
    at = size // 2 if at is None else at
    with open(file, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))
    return file


def test_every_file_has_a_checksum_recorded_before_the_rename(checkpoint):
    record = json.load(open(os.path.join(checkpoint, CHECKSUMS_FILE)))
    assert record["algorithm"] == "sha256"
    names = {n for n in os.listdir(checkpoint) if n != CHECKSUMS_FILE}
    assert set(record["files"]) == names        # .metadata, each .distcp (no per-rank files)
    for name, entry in record["files"].items():
        assert entry["sha256"] == file_sha256(os.path.join(checkpoint, name))


@pytest.mark.parametrize("where", ["table bytes", "metadata"])
def test_a_changed_byte_is_an_error_naming_the_file(checkpoint, where):
    name = "__0_0.distcp" if where == "table bytes" else ".metadata"
    file = _flip(checkpoint, name)
    readers = [lambda: read_metadata(checkpoint) if name == ".metadata" else None,
               lambda: load_checkpoint(checkpoint, {"model": _Model()}),
               lambda: read_tensors(checkpoint),
               lambda: load_rows(checkpoint, "model.table.weight", 0, 1),
               lambda: verify_checkpoint(checkpoint)]
    for read in readers[0 if name == ".metadata" else 1:]:
        with pytest.raises(CheckpointError) as error:
            read()
        assert _one_line(error.value) == (f"checkpoint {checkpoint} is damaged: {file} does "
                                          "not match the sha256 recorded when it was saved")


def test_truncated_or_missing_data_file_is_named(checkpoint):
    file = os.path.join(checkpoint, "__0_0.distcp")
    size = os.path.getsize(file)
    os.truncate(file, size - 10)
    with pytest.raises(CheckpointError, match=f"{file} has {size - 10} bytes, {size} were"):
        load_rows(checkpoint, "model.table.weight", 0, 1)
    os.remove(file)
    with pytest.raises(CheckpointError, match=f"{file} is missing"):
        load_checkpoint(checkpoint, {"model": _Model()})


def test_a_data_file_linked_to_outside_the_checkpoint_is_refused(checkpoint, tmp_path):
    outside = tmp_path / "secret.distcp"
    file = os.path.join(checkpoint, "__0_0.distcp")
    shutil.move(file, outside)
    os.symlink(outside, file)
    with pytest.raises(CheckpointError) as error:
        load_rows(checkpoint, "model.table.weight", 0, 1)
    assert _one_line(error.value) == (f"checkpoint {checkpoint}: {file} is a symbolic link "
                                      "to a file outside the checkpoint")


def test_resume_skips_a_damaged_newest_checkpoint_with_a_warning(tmp_path, caplog):
    save = tmp_path / "save"
    for step, kind in ((1, "sgd"), (2, "adagrad"), (3, "adagrad")):
        _save(save, step, kind)
    damaged = _flip(str(save / "3"), "__0_0.distcp")
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(str(save)) == str(save / "2")
    assert f"skipping the damaged checkpoint {save / '3'}" in caplog.text
    assert f"{damaged} does not match the sha256" in caplog.text
    load_checkpoint(str(save / "2"), {"model": _Model()})
    _flip(str(save / "2"), "__0_0.distcp", at=100)
    _flip(str(save / "1"), ".metadata", at=50)
    with pytest.raises(CheckpointError, match=f"no intact checkpoint in {save}: checkpoint "
                                              f"{save / '3'} is damaged"):
        latest_checkpoint(str(save))


def test_a_torn_copy_is_skipped_and_the_newest_complete_one_used(tmp_path, caplog):
    import shutil

    save = tmp_path / "save"
    _save(save, 5)
    shutil.copytree(save / "5", save / "9")
    os.remove(save / "9" / ".metadata")               # copied half-way: no .metadata
    (save / "12").mkdir()                             # copy just started
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(str(save)) == str(save / "5")
    for torn in ("9", "12"):
        assert f"skipping {save / torn}: not a complete checkpoint" in caplog.text
    # A copy with .metadata but data files still missing: damaged, skipped, named.
    shutil.copytree(save / "5", save / "20")
    os.remove(save / "20" / "__0_0.distcp")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(str(save)) == str(save / "5")
    assert f"{save / '20' / '__0_0.distcp'} is missing" in caplog.text


def test_an_old_checkpoint_without_checksums_loads_with_a_warning(tmp_path, caplog):
    table = torch.randn(50, 8)
    old = tmp_path / "save" / "4"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": {"table": {"weight": table}}}, checkpoint_id=str(old), no_dist=True)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(str(tmp_path / "save")) == str(old)
        assert torch.equal(load_rows(str(old), "model.table.weight", 3, 9), table[3:9])
    assert f"checkpoint {old} has no checksums.json" in caplog.text
    file = os.path.join(old, "__0_0.distcp")
    os.truncate(file, 100)
    with pytest.raises(CheckpointError, match=f"{file} is truncated"):
        load_rows(str(old), "model.table.weight", 0, 1)


# --- fuzz ------------------------------------------------------------------------------

def test_fuzzed_metadata_is_read_or_refused_in_one_line(tmp_path_factory, pristine):
    """Random edits of a real .metadata: success or one-line CheckpointError, nothing run."""
    import shutil

    valid = open(os.path.join(pristine, ".metadata"), "rb").read()
    root = tmp_path_factory.mktemp("fuzz")
    target = root / "1"
    shutil.copytree(pristine, target)
    os.remove(target / CHECKSUMS_FILE)      # old-style: the unpickler alone is tested
    marker = root / "pwned"
    seen = {"ok": 0, "error": 0}

    @FUZZ_SETTINGS
    @given(data=st.one_of(mutated(valid), mutated(_gadgets(str(marker))[GADGET_NAMES[0]])))
    def check(data):
        (target / ".metadata").write_bytes(data)
        seen[outcome(lambda: read_metadata(str(target)))] += 1
        assert not marker.exists()

    started = time.monotonic()
    check()
    assert time.monotonic() - started < 20
    assert seen["error"] > 0


def test_no_reader_in_tml_unpickles_checkpoint_files_another_way():
    """Source guard: checkpoint bytes are unpickled only by checkpoint_unpickle, and every
    DCP load is given tml's SafeFileSystemReader (or a subclass)."""
    import re

    from tests.twhin_setup import REPO

    offenders = []
    for top in ("tml", "projects"):
        for base, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(base, name)
                text = open(path).read()
                relative = os.path.relpath(path, REPO)
                if relative != "tml/common/checkpoint_unpickle.py" and re.search(
                        r"pickle\.(loads?|Unpickler)\b|torch\.load\(|weights_only=False", text):
                    offenders.append(relative)
                for call in re.findall(r"dcp\.load\([^)]*\)", text, flags=re.S):
                    if not re.search(r"storage_reader=(SafeFileSystemReader|_RowRangeReader)",
                                     call):
                        offenders.append(f"{relative}: {call}")
    assert offenders == []
