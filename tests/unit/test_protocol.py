"""The client side of the daemon's wire protocol: ``nudge`` (the hooks' and the agent's)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

from slurm_plugin.protocol import nudge
from tests.waiting import wait_for


class LineServer:
    """A Unix-socket server that records request lines and answers (or stays silent)."""

    def __init__(self, path: str, answer: bytes | None) -> None:
        self.lines: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.answer = answer
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                conn.settimeout(2)
                try:
                    while not data.endswith(b"\n"):
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    self.lines.append(data)
                    if self.answer is None:
                        conn.recv(1)  # hold the line open until the client gives up
                    else:
                        conn.sendall(self.answer)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def test_nudge_reaches_the_daemon(tmp_path: Path) -> None:
    server = LineServer(str(tmp_path / "d.sock"), b'{"v":1,"ok":true}\n')
    try:
        assert nudge(str(tmp_path / "d.sock"), timeout=2.0) is True
        wait_for(lambda: server.lines, timeout=5, what="the nudge line")
        assert json.loads(server.lines[0]) == {"v": 1, "op": "nudge"}
    finally:
        server.close()


def test_nudge_never_raises_and_never_hangs(tmp_path: Path) -> None:
    assert nudge(str(tmp_path / "missing.sock")) is False
    assert nudge("\0" * 200) is False
    silent = LineServer(str(tmp_path / "silent.sock"), None)
    junk = LineServer(str(tmp_path / "junk.sock"), b"garbage\n")
    try:
        t0 = time.monotonic()
        assert nudge(str(tmp_path / "silent.sock"), timeout=0.05) is False
        assert time.monotonic() - t0 < 1.0
        assert nudge(str(tmp_path / "junk.sock"), timeout=2.0) is False
    finally:
        silent.close()
        junk.close()


def test_nudge_is_true_only_for_an_ok(tmp_path: Path) -> None:
    for i, answer in enumerate((b'{"v":1,"ok":false,"error":"not a controller"}\n', b"[1]\n",
                                b'{"v":1,"ok":"yes"}\n', b"")):
        server = LineServer(str(tmp_path / f"{i}.sock"), answer)
        try:
            assert nudge(str(tmp_path / f"{i}.sock"), timeout=2.0) is False, answer
        finally:
            server.close()
