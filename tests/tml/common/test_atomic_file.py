"""`tml.common.atomic_file`: the path holds the old file or the whole new one, never half."""

import json
import os
import stat
import threading

import pytest

from tml.common.atomic_file import write_atomic, write_json_atomic, write_text_atomic


def test_json_and_text_are_written_and_replace_the_old_file(tmp_path):
    path = tmp_path / "best.json"
    write_json_atomic(str(path), {"b": 1, "a": [2]}, indent=1, newline=True)
    assert path.read_text() == '{\n "a": [\n  2\n ],\n "b": 1\n}\n'
    write_json_atomic(str(path), {"b": 2, "a": 1}, sort_keys=False)
    assert path.read_text() == '{"b": 2, "a": 1}'
    write_text_atomic(str(path), "host:1234", fsync=True)
    assert path.read_text() == "host:1234"
    assert os.listdir(tmp_path) == ["best.json"]


@pytest.mark.parametrize("error", [ValueError("bad"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "record.json"
    path.write_text('{"step": 1}')

    def half_then_fail(handle):
        handle.write('{"step": ')
        raise error

    with pytest.raises(type(error)):
        write_atomic(str(path), half_then_fail)
    assert path.read_text() == '{"step": 1}'
    assert os.listdir(tmp_path) == ["record.json"]
    with pytest.raises(TypeError):                       # not JSON: nothing written either
        write_json_atomic(str(path), {"step": object()})
    assert path.read_text() == '{"step": 1}'
    assert os.listdir(tmp_path) == ["record.json"]


def test_the_file_gets_the_umask_permissions_like_a_plain_open(tmp_path):
    previous = os.umask(0o027)
    try:
        write_text_atomic(str(tmp_path / "port"), "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "port").st_mode) == 0o640


def test_concurrent_writers_of_one_path_never_leave_it_half_written(tmp_path):
    path = str(tmp_path / "run.json")
    write_json_atomic(path, {"writer": -1, "payload": "x" * 100_000})
    seen, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            with open(path) as handle:
                seen.append(json.load(handle)["writer"])   # raises on a half-written file

    def write(writer):
        for _ in range(30):
            write_json_atomic(path, {"writer": writer, "payload": "x" * 100_000})

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    reader.join()
    assert seen and set(seen) <= {-1, 0, 1, 2, 3}
    assert os.listdir(tmp_path) == ["run.json"]
