"""A node whose rendezvous endpoint is not a c10d store, or that is stopped while waiting:
it ends within TML_RDZV_TIMEOUT with one line naming the endpoint, and leaves no temporary
directories (each launch gets a private TMPDIR, listed before and after)."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.tml.common.test_launch_nodes import CLUSTER_VARS, SCRIPTS, _free_port, _wait_listening
from tests.twhin_setup import launcher_env

TOY = os.path.join(SCRIPTS, "toy_train.py")


class FakeEndpoint:
    """A TCP server on 127.0.0.1 that is not a c10d store: `silent` accepts and says nothing,
    `http` answers every connection like a web server."""

    def __init__(self, kind):
        self.kind = kind
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.held = []
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            if self.kind == "http":
                try:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                except OSError:
                    pass
                conn.close()
            else:
                self.held.append(conn)

    def close(self):
        self.server.close()
        for conn in self.held:
            conn.close()


def _env(tmpdir, **extra):
    return launcher_env(CLUSTER_VARS, TMPDIR=str(tmpdir), TML_NUM_NODES="2",
                        TML_RUN_ID="job", **extra)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["silent", "http"])
def test_non_chief_with_an_endpoint_that_is_not_a_store_fails_in_time(tmp_path, kind):
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    endpoint = FakeEndpoint(kind)
    try:
        start = time.monotonic()
        result = subprocess.run(
            [sys.executable, TOY, f"--out_dir={tmp_path}", "--nproc=1"],
            env=_env(private_tmp, TML_RDZV_ENDPOINT=f"127.0.0.1:{endpoint.port}",
                     TML_RDZV_TIMEOUT="5"),
            capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - start
    finally:
        endpoint.close()
    assert endpoint.accepted >= 1  # it did reach the fake endpoint
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    expected = {"silent": "accepts connections but did not answer as a torch c10d store "
                          "within 5 s",
                "http": "answered, but not as a torch c10d store"}[kind]
    assert errors == [f"error: the rendezvous endpoint 127.0.0.1:{endpoint.port} {expected} "
                      "(another service on that port?): check TML_RDZV_ENDPOINT (host:port "
                      "of the chief node's rendezvous) and that the chief is running"]
    assert "Traceback" not in result.stderr
    # ~5 s of waiting plus two imports of torch (measured 14-17 s on 2 busy cores).
    assert elapsed < 60, elapsed
    assert not list(tmp_path.glob("rank*.json"))  # no worker ran
    assert os.listdir(private_tmp) == []


@pytest.mark.slow
def test_non_chief_without_a_chief_fails_in_time(tmp_path):
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    port = _free_port()
    result = subprocess.run(
        [sys.executable, TOY, f"--out_dir={tmp_path}", "--nproc=1"],
        env=_env(private_tmp, TML_RDZV_ENDPOINT=f"127.0.0.1:{port}", TML_RDZV_TIMEOUT="5"),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"error: no rendezvous store answered at 127.0.0.1:{port} within 5 s " \
           "(TML_RDZV_TIMEOUT)" in result.stderr
    assert os.listdir(private_tmp) == []


@pytest.mark.slow
def test_a_launcher_stopped_while_waiting_for_nodes_removes_its_temp_dirs(tmp_path):
    """SIGTERM (a scheduler cancelling the job) while the chief waits for the other node."""
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    port = _free_port()
    chief = subprocess.Popen(
        [sys.executable, TOY, f"--out_dir={tmp_path}", "--nproc=1"],
        env=_env(private_tmp, TML_IS_CHIEF="1", TML_RDZV_ENDPOINT=f"127.0.0.1:{port}",
                 TML_RDZV_TIMEOUT="120"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_listening(port)
        deadline = time.monotonic() + 60
        while not os.listdir(private_tmp) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert os.listdir(private_tmp), "the launcher made no log directory"
        time.sleep(1.0)  # inside torch elastic's rendezvous
        chief.send_signal(signal.SIGTERM)
        output = chief.communicate(timeout=60)[0]
    finally:
        if chief.poll() is None:
            chief.kill()
    assert chief.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert os.listdir(private_tmp) == []
