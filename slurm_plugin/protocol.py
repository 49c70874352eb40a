"""The daemon's wire protocol: versioned JSON lines over a Unix socket.

Request:  {"v": 1, "op": "submit", ...}\\n
Response: {"v": 1, "ok": true, ...}\\n   (ok false carries "error": a sentence for a human)

Peers are identified by SO_PEERCRED, never by anything they say about themselves.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any, NamedTuple

PROTOCOL_VERSION = 1
MAX_LINE = 1 << 20
"""Longest request line accepted (a 100 kB comment fits with room to spare)."""


class ProtocolError(Exception):
    """A request that is not a JSON object line of a version we speak."""


class Peer(NamedTuple):  # not a dataclass: dataclasses costs each hook's nudge ~5 ms
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Parse one request line. Non-UTF-8 bytes are kept as surrogates, so they can be
    reported and rejected by the policy instead of breaking the parse."""
    text = line.decode("utf-8", "surrogateescape").strip()
    if not text:
        raise ProtocolError("empty request")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"request is not JSON: {exc.msg} at column {exc.colno}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("request must be a JSON object")
    v = obj.get("v")
    if v != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {v!r}; this daemon speaks {PROTOCOL_VERSION}")
    if not isinstance(obj.get("op"), str):
        raise ProtocolError("request has no 'op'")
    return obj


class DaemonUnavailable(Exception):
    """The daemon socket could not be reached or did not answer in time."""


def call(socket_path: str, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One request/response round trip (used by the CLI and tests)."""
    request = {"v": PROTOCOL_VERSION, **request}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(socket_path)
            s.sendall(encode(request))
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DaemonUnavailable(
            f"the slurmgate daemon is not running (no listener at {socket_path}); "
            "start it with `slurmgate daemon` or your service manager"
        ) from exc
    except PermissionError as exc:
        raise DaemonUnavailable(f"no permission to connect to {socket_path}") from exc
    except OSError as exc:
        raise DaemonUnavailable(
            f"cannot talk to the slurmgate daemon at {socket_path}: {exc}") from exc
    if not buf:
        raise DaemonUnavailable("the slurmgate daemon closed the connection without answering")
    return json.loads(buf)


def nudge(socket_path: str, timeout: float = 0.05) -> bool:
    """Tell the daemon the spool has new records (the hooks and the node agent, after each
    record). One ``call`` with a short ``timeout`` for each step (connect, send, read): a
    daemon that is down, slow or confused costs the hook that long at most per step, and the
    records wait in the spool for the daemon's next scan. Never raises; True if it answered
    ok."""
    try:
        return call(socket_path, {"op": "nudge"}, timeout=timeout).get("ok") is True
    except Exception:
        return False
