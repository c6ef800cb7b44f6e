"""Before a non-chief node joins, check that its rendezvous endpoint is a c10d store.

Why: torch elastic's c10d rendezvous opens a `TCPStore` client to the endpoint, and the
client's handshake (validate, then ping) reads the reply with no timeout (torch 2.13,
measured): a server that accepts the connection and says nothing (a wrong port, a stuck
process) keeps the node waiting forever, whatever `TML_RDZV_TIMEOUT` says. A server that
answers something else (HTTP) makes the client retry for `read_timeout` (60 s by default;
tml now passes the rendezvous timeout), then fail with a traceback.

The probe opens the same client in a thread and waits at most the timeout for it. A client
stuck in its handshake cannot be interrupted from Python, and a process that still runs
one does not exit cleanly (measured: 20-30 s at exit, or `terminate called without an
active exception`), so the probe then shuts its socket down (found through /proc/self/fd:
the one connected to the endpoint), which ends the handshake with an error, and joins the
thread. The probe runs before torch elastic creates anything, so a failed probe leaves no
temporary directories behind.
"""

from __future__ import annotations

import os
import socket
import threading
from datetime import timedelta

from tml.errors import TmlError

_ADVICE = ("check TML_RDZV_ENDPOINT (host:port of the chief node's rendezvous) and that the "
           "chief is running")


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.rsplit(":", 1)
    return host.strip("[]"), int(port)


def _peer_addresses(host: str, port: int) -> set[tuple[str, int]]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return set()
    found = set()
    for family, _, _, _, address in infos:
        found.add((address[0], port))
        if family == socket.AF_INET:  # the client may use a v4-mapped IPv6 socket
            found.add(("::ffff:" + address[0], port))
    return found


def _shut_down_sockets_to(host: str, port: int) -> int:
    """Shut down this process's sockets connected to host:port; how many (Linux only)."""
    wanted = _peer_addresses(host, port)
    closed = 0
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return 0
    for fd in fds:
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(fd)) as sock:
                peer = sock.getpeername()
                if isinstance(peer, tuple) and (peer[0], peer[1]) in wanted:
                    sock.shutdown(socket.SHUT_RDWR)
                    closed += 1
        except OSError:
            continue
    return closed


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


def probe_rendezvous_store(endpoint: str, timeout_s: float) -> None:
    """Return once a c10d store answers at `endpoint`; TmlError naming it if none does.

    Waits up to `timeout_s` for the chief to come up (the store client retries connecting),
    like the rendezvous itself would.
    """
    from torch.distributed import TCPStore

    host, port = _split_endpoint(endpoint)
    outcome: list[str] = []

    def connect() -> None:
        try:
            store = TCPStore(host, port, is_master=False, multi_tenant=True,
                             timeout=timedelta(seconds=max(1.0, timeout_s)))
            del store  # closes the probe's connection
            outcome.append("ok")
        except Exception as error:  # noqa: BLE001 (the store raises several types)
            outcome.append(str(error) or type(error).__name__)

    thread = threading.Thread(target=connect, name="tml-rdzv-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    silent = thread.is_alive()
    if silent:
        _shut_down_sockets_to(host, port)
        # Ends the handshake at once; a client still retrying to connect gives up after
        # its own timeout, a little later.
        thread.join(10.0)
    if not silent and outcome and outcome[0] == "ok":
        return
    answered = " ".join(outcome)
    if "Ping failed" in answered or "invalid value" in answered:
        raise TmlError(f"the rendezvous endpoint {endpoint} answered, but not as a torch c10d "
                       f"store (another service on that port?): {_ADVICE}")
    if _accepts_connections(host, port):
        raise TmlError(f"the rendezvous endpoint {endpoint} accepts connections but did not "
                       f"answer as a torch c10d store within {timeout_s:g} s (another "
                       f"service on that port?): {_ADVICE}")
    raise TmlError(f"no rendezvous store answered at {endpoint} within {timeout_s:g} s "
                   f"(TML_RDZV_TIMEOUT): {_ADVICE}, or raise TML_RDZV_TIMEOUT")
