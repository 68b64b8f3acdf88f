"""web/connections and the body limit against a real uvicorn in a subprocess (a fake classifier: no TensorFlow):
idle, slow-header and stalled-body clients, and a 640 MB body, with a lowered file-descriptor limit."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from conftest import ROOT

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install 'cnncodes[web]'")
httpx = pytest.importorskip("httpx", reason="the test extra is not installed: pip install 'cnncodes[test]'")
psutil = pytest.importorskip("psutil", reason="the test extra is not installed: pip install 'cnncodes[test]'")

pytestmark = pytest.mark.slow
FD_LIMIT = 256
SERVER = """
import resource, sys
import numpy as np
sys.path.insert(0, {root!r})
resource.setrlimit(resource.RLIMIT_NOFILE, ({fds}, {fds}))
from pipeline.web.api import ServeLimits, create_app
from pipeline.web.connections import run_server

class Fake:
    classes, image_size, resize, backbone, unknown_threshold = ["a", "b"], 8, "bilinear", "fake", None
    def predict_scored(self, images):
        return np.column_stack([np.full((len(images), 2), 0.5), np.full(len(images), np.nan)])

limits = ServeLimits(max_request_mb={request_mb}, body_timeout_s={body_s})
run_server(create_app(Fake(), limits), "127.0.0.1", {port}, max_connections=256, header_timeout_s={header_s},
           log=lambda m: print(m, flush=True))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def live_server(tmp_path: Path, request_mb: float = 8, body_s: float = 60, header_s: float = 10) -> Iterator[tuple]:
    """(port, psutil process) of a server limited to FD_LIMIT descriptors, once /health answers."""
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SERVER.format(
                    root=str(ROOT), fds=FD_LIMIT, port=port, request_mb=request_mb, body_s=body_s, header_s=header_s
                ),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield port, psutil.Process(server.pid)
    finally:
        server.terminate()
        server.wait(30)


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """True when the server closes sock (EOF or reset) within within_s seconds."""
    sock.settimeout(within_s)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def read_until_closed(sock: socket.socket) -> bytes:
    """What the server sent before it closed sock; the head and the JSON body may come in separate packets.
    A reset or the socket's timeout ends the answer early (closing an unread socket may reset it)."""
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return answer


def test_300_idle_sockets_leave_health_answering(tmp_path: Path) -> None:
    """With 256 descriptors, 300 connections that send nothing used to hold them all (uvicorn times out none)."""
    with live_server(tmp_path) as (port, process):
        idle = []
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            idle.append(sock)
        time.sleep(0.3)
        try:
            for _ in range(3):
                start = time.perf_counter()
                assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
                assert time.perf_counter() - start < 1
            assert process.num_fds() < FD_LIMIT
            assert closed_by_server(idle[0], 1), "the longest-idle connection was not closed to make room"
        finally:
            for sock in idle:
                sock.close()


def test_slow_headers_are_cut_off(tmp_path: Path) -> None:
    """A header byte now and then (slowloris) no longer keeps a connection: HEADER_TIMEOUT_S (1 s here)."""
    with live_server(tmp_path, header_s=1) as (port, _):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            start = time.monotonic()
            try:
                while time.monotonic() - start < 5:
                    sock.sendall(b"X")  # never a complete header line
                    time.sleep(0.2)
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert closed_by_server(sock, 1)
            assert time.monotonic() - start < 3
        # an ordinary client on a kept-alive connection is not affected
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert client.get("/health").status_code == 200
            time.sleep(0.5)
            assert client.get("/health").status_code == 200


def test_stalled_body_is_answered_408(tmp_path: Path) -> None:
    with live_server(tmp_path, body_s=1) as (port, _), socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
        )
        start = time.monotonic()
        sock.settimeout(5)
        answer = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"did not arrive within 1 s" in answer, answer
        assert time.monotonic() - start < 3


PART_HEAD = b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'


def send_until_refused(port: int, head: bytes, total: int, part: int = 1 << 20) -> tuple[int, bytes]:
    """Send head and a multipart file part of up to total bytes, until the server closes; (bytes sent, answer)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        sock.sendall(head + (b"%x\r\n%s\r\n" % (len(PART_HEAD), PART_HEAD) if b"chunked" in head else PART_HEAD))
        sock.settimeout(10)
        chunk = b"%x\r\n" % part + b"x" * part + b"\r\n" if b"chunked" in head else b"x" * part
        try:
            while sent < total:
                sock.sendall(chunk)
                sent += part
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        answer = read_until_closed(sock)
    return sent, answer


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_640_mb_body_is_refused_early(tmp_path: Path, declared: bool) -> None:
    """A 640 MB body (a 8 MB limit here) is refused having read at most the limit and what the sockets buffer."""
    total, limit = 640 * 2**20, 8 * 10**6
    length = f"Content-Length: {total}" if declared else "Transfer-Encoding: chunked"
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"{length}\r\n\r\n"
    ).encode()
    with live_server(tmp_path, request_mb=limit / 1e6) as (port, process):
        rss = process.memory_info().rss
        sent, answer = send_until_refused(port, head, total)
        # the limit, one more 1 MiB part, and what the two kernel socket buffers hold
        assert sent <= (0 if declared else limit) + 8 * 2**20, f"sent {sent / 2**20:.0f} MB before the refusal"
        assert process.memory_info().rss - rss < 40 * 2**20
        if answer:  # the answer may be lost to the reset that closing an unread socket causes
            assert answer.startswith(b"HTTP/1.1 413") and b"--max-request-mb" in answer, answer[:300]
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
