"""job_submit.lua as rendered: valid Lua 5.1, with user-controlled values safely quoted."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from slurm_plugin.daemon.lua_shim import lua_string, render_lua

LUA = shutil.which("lua5.1")
# lua5.1 is installed by contrib/devcluster/cluster.sh (make test); never skipped there.
needs_lua = pytest.mark.skipif(LUA is None, reason="lua5.1 not installed (make test installs it)")


@needs_lua
@pytest.mark.parametrize("text", ['plain', 'with "quotes"', "new\nline", "back\\slash",
                                  "]] os.exit(1) --[[", "ünïcödé", "%s%n"])
def test_lua_string_round_trips(text):
    out = subprocess.run([LUA, "-e", f"io.write({lua_string(text)})"], capture_output=True,
                         timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode("utf-8") == text


@needs_lua
@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_rendered_script_compiles(tmp_path, fail_mode):
    script = tmp_path / "job_submit.lua"
    script.write_text(render_lua('/run/sg "x"\n.sock', 200, fail_mode, 64030))
    out = subprocess.run([shutil.which("luac5.1") or "luac5.1", "-p", str(script)],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr


@needs_lua
def test_shim_marks_unchecked_when_the_daemon_is_unreachable(tmp_path):
    """Run the shim's submit path under plain Lua with a stub `slurm` table."""
    script = tmp_path / "job_submit.lua"
    script.write_text(render_lua(str(tmp_path / "absent.sock"), 50, "open", 0))
    harness = f"""
slurm = {{ SUCCESS = 0, ERROR = -1, NICE_OFFSET = 2147483648,
          log_user = function(...) end, log_error = function(...) end,
          log_info = function(...) end }}
dofile({lua_string(str(script))})
local job = {{ comment = "project=x", user_name = "alice" }}
local rc = slurm_job_submit(job, {{}}, 1000)
io.write(tostring(rc), " ", tostring(job.admin_comment))
"""
    out = subprocess.run([LUA, "-e", harness], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "0 slurmgate:unchecked"


def test_render_refuses_bad_settings():
    with pytest.raises(ValueError):
        render_lua("/s", 200, "sometimes")
    with pytest.raises(ValueError):
        render_lua("/s", 0, "open")
