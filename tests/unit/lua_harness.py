"""Run the rendered job_submit.lua under plain lua5.1, against a stub daemon on a Unix socket.

``run_lua`` loads the script with a stub ``slurm`` table (the constants and log functions
slurmctld registers, as in Slurm 22.05-26.05), runs a Lua snippet and returns what it put in
the global ``OUT`` table (as JSON, via lua-cjson) plus every slurm.log_* line.
``StubDaemon`` is a threaded Unix-socket server that records each request line with the
time it arrived and the connection it came on, and answers as its ``behave`` callback says.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slurm_plugin.daemon.lua_shim import lua_string, render_lua

LUA = shutil.which("lua5.1")
LUAC = shutil.which("luac5.1")
SLURM_UID = 64030
NICE_OFFSET = 2147483648
NO_VAL = 4294967294
NO_VAL16 = 65534
ACCESS_DENIED = 2002

STUB = """
LOG = {}
local function logger(kind)
  return function(fmt, ...) LOG[#LOG + 1] = kind .. ": " .. string.format(fmt, ...) end
end
slurm = { SUCCESS = 0, ERROR = -1, FAILURE = -1, ESLURM_ACCESS_DENIED = %(denied)d,
          NICE_OFFSET = %(nice)d, NO_VAL = %(no_val)d, NO_VAL16 = %(no_val16)d,
          NO_VAL64 = 18446744073709551614, MEM_PER_CPU = 9223372036854775808,
          log_user = logger("user"), log_error = logger("error"), log_info = logger("info"),
          log_debug = logger("debug") }
NO_VAL, NO_VAL16, NICE_OFFSET = slurm.NO_VAL, slurm.NO_VAL16, slurm.NICE_OFFSET
OUT = {}
local cjson = require("cjson")
local gettime = require("socket.core").gettime
sleep = require("socket.core").sleep
now = gettime
dofile(%(script)s)
"""

TAIL = """
io.write(cjson.encode({ out = OUT, log = LOG }))
"""


def render(tmp: Path, socket_path: str | Path, timeout_ms: int = 200, fail_mode: str = "open",
           name: str = "job_submit.lua") -> Path:
    script = tmp / name
    script.write_text(render_lua(str(socket_path), timeout_ms, fail_mode, SLURM_UID))
    return script


def lua_program(script: Path, body: str) -> str:
    return STUB % {"denied": ACCESS_DENIED, "nice": NICE_OFFSET, "no_val": NO_VAL,
                   "no_val16": NO_VAL16, "script": lua_string(str(script))} + body + TAIL


def lua_call_modify(desc: str, rec: str, uid: int) -> str:
    """A Lua snippet calling slurm_job_modify(desc, rec, {}, uid); desc and rec are Lua
    expressions (the globals NO_VAL, NO_VAL16 and NICE_OFFSET are defined)."""
    return (f"local job_desc = {desc}\nlocal job_rec = {rec}\n"
            f"OUT.rc = slurm_job_modify(job_desc, job_rec, {{}}, {uid})\n")


def run_lua(script: Path, body: str, timeout: float = 20) -> dict[str, Any]:
    """Run ``body`` after loading ``script``; returns {"out": OUT, "log": [lines]}."""
    proc = subprocess.run([LUA, "-e", lua_program(script, body)], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    if isinstance(res.get("log"), dict):  # cjson encodes an empty table as {}
        res["log"] = []
    if isinstance(res.get("out"), list):
        res["out"] = {}
    return res


def start_lua(script: Path, body: str) -> subprocess.Popen:
    return subprocess.Popen([LUA, "-e", lua_program(script, body)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_lua(proc: subprocess.Popen, timeout: float = 20) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out)


def accept_reply(req: dict[str, Any], **set_fields: Any) -> dict[str, Any]:
    reply: dict[str, Any] = {"v": 1, "ok": True, "id": req.get("id"), "verdict": "accept"}
    if set_fields:
        reply["set"] = set_fields
    return reply


# behave(conn_no, n_on_conn, request) -> an action:
#   {"reply": dict}                   answer
#   {"sleep": seconds, "reply": dict} answer late
#   {"close": True}                   close the connection without answering
Behave = Callable[[int, int, dict[str, Any]], dict[str, Any]]


class StubDaemon:
    """The daemon's side of the socket. ``requests`` holds (conn_no, arrival time, request)."""

    def __init__(self, path: Path, behave: Behave | None = None,
                 close_after_reply: Callable[[int, int], bool] | None = None):
        self.path = str(path)
        self.behave = behave or (lambda c, n, req: {"reply": accept_reply(req)})
        self.close_after_reply = close_after_reply or (lambda c, n: False)
        self.requests: list[tuple[int, float, dict[str, Any]]] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sock: socket.socket | None = None

    def __enter__(self) -> StubDaemon:
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in list(self._threads):
            t.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                conn_no = self.connections
            t = threading.Thread(target=self._serve, args=(conn, conn_no), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket, conn_no: int) -> None:
        conn.settimeout(0.05)
        buf = b""
        n = 0
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    req = json.loads(line)
                    n += 1
                    with self._lock:
                        self.requests.append((conn_no, time.time(), req))
                    action = self.behave(conn_no, n, req)
                    if action.get("close"):
                        return
                    if action.get("sleep"):
                        time.sleep(action["sleep"])
                    try:
                        conn.sendall(json.dumps(action["reply"]).encode() + b"\n")
                    except OSError:
                        return
                    if self.close_after_reply(conn_no, n):
                        return

    def wait_quiet(self, seconds: float) -> None:
        """Give a (wrongly) resent request time to arrive."""
        time.sleep(seconds)
