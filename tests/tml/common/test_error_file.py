"""A worker's torch elastic error file is whole or absent, and the agent parses it."""

import json
import os
import signal

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from tml.common.error_file import ERROR_FILE_ENV, record_error


def _failure(path, exitcode):
    return ProcessFailure(local_rank=0, pid=4242, exitcode=exitcode, error_file=str(path))


def test_the_agent_reads_the_recorded_error(tmp_path, monkeypatch):
    path = tmp_path / "error.json"
    monkeypatch.setenv(ERROR_FILE_ENV, str(path))
    try:
        raise ValueError("row 7 of triples.tsv: bad id")
    except ValueError as error:
        record_error(error)
    failure = _failure(path, 1)
    assert failure.message["message"] == "ValueError: row 7 of triples.tsv: bad id"
    assert "raise ValueError" in failure.error_file_data["message"]["extraInfo"]["py_callstack"]
    assert os.listdir(tmp_path) == ["error.json"]


def test_an_interrupted_write_leaves_no_file_for_the_agent_to_choke_on(tmp_path, monkeypatch):
    """SIGTERM from the agent while the record is being written: the path stays absent, so
    the agent names the signal instead of dying on an empty JSON file."""
    path = tmp_path / "error.json"
    monkeypatch.setenv(ERROR_FILE_ENV, str(path))

    def interrupted_dump(data, out, **options):
        out.write('{"message": ')
        out.flush()
        raise SystemExit(-signal.SIGTERM)

    monkeypatch.setattr(json, "dump", interrupted_dump)
    with pytest.raises(SystemExit):
        try:
            raise RuntimeError("lost the connection to another worker")
        except RuntimeError as error:
            record_error(error)
    assert not path.exists()
    assert os.listdir(tmp_path) == []
    assert _failure(path, -signal.SIGTERM).message.startswith("Signal 15 (SIGTERM)")


def test_nothing_is_written_without_an_error_file(tmp_path, monkeypatch):
    monkeypatch.delenv(ERROR_FILE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    try:
        raise ValueError("x")
    except ValueError as error:
        record_error(error)
    assert os.listdir(tmp_path) == []
