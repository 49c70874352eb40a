"""The `slurmgate` command.

Imports are lazy per sub-command: `slurmgate hook ...` runs in every Prolog/Epilog and must
start fast, so nothing heavy is imported before we know which command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

DEFAULT_CONFIG = "/etc/slurmgate/policy.toml"


def config_path(args: argparse.Namespace) -> str:
    return args.config or os.environ.get("SLURMGATE_CONFIG") or DEFAULT_CONFIG


def _policy(args: argparse.Namespace):  # -> Policy (lazy import keeps start-up light)
    from policies.config import PolicyError, load_policy

    try:
        return load_policy(config_path(args))
    except PolicyError as exc:
        raise SystemExit(f"slurmgate: {exc}") from exc


def _call(args: argparse.Namespace, request: dict) -> dict:
    from slurm_plugin.protocol import DaemonUnavailable, call

    socket_path = args.socket or _policy(args).daemon.socket
    try:
        resp = call(socket_path, request)
    except DaemonUnavailable as exc:
        raise SystemExit(f"slurmgate: {exc}") from exc
    if not resp.get("ok"):
        raise SystemExit(f"slurmgate: {resp.get('error', 'request failed')}")
    return resp


def cmd_daemon(args: argparse.Namespace) -> int:
    from slurm_plugin.daemon import serve

    return serve(config_path(args))


def cmd_lua(args: argparse.Namespace) -> int:
    from slurm_plugin.lua_shim import render_lua

    socket_path = args.socket or _policy(args).daemon.socket
    text = render_lua(socket_path, args.timeout_ms, args.fail_mode)
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, args.output)  # slurmctld reloads the script when its mtime changes
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    resp = _call(args, {"op": "ping"})
    print(json.dumps(resp, indent=2))
    return 0


def cmd_check_policy(args: argparse.Namespace) -> int:
    policy = _policy(args)
    print(f"{config_path(args)}: OK ({len(policy.teams)} teams, "
          f"required tags: {', '.join(policy.tags.required) or 'none'})")
    return 0


def cmd_tui(args: argparse.Namespace) -> int:
    from tui.app import run

    return run(config_path(args), demo=args.demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slurmgate",
        description="Job tags, team budgets, GPU accounting and requeue for Slurm GPU clusters.",
    )
    p.add_argument("--config", help=f"policy file (default $SLURMGATE_CONFIG or {DEFAULT_CONFIG})")
    p.add_argument("--socket", help="daemon socket (default: daemon.socket from the policy file)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=fn)
        return sp

    add("daemon", cmd_daemon, "run the policy daemon (foreground)")
    sp = add("lua", cmd_lua, "print or install job_submit.lua for slurmctld")
    sp.add_argument("--timeout-ms", type=int, default=200, help="bound on every wait (default 200)")
    sp.add_argument("--fail-mode", choices=["open", "closed"], default="open",
                    help="daemon unreachable: accept and mark unchecked (open) or reject (closed)")
    sp.add_argument("-o", "--output", help="write to this path atomically instead of stdout")
    add("ping", cmd_ping, "check that the daemon answers")
    add("check-policy", cmd_check_policy, "validate the policy file and say what is wrong")
    sp = add("tui", cmd_tui, "open the admin terminal UI")
    sp.add_argument("--demo", action="store_true", help="show a fixed sample dataset")
    sub.add_parser("hook", help="Slurm hooks: prolog | epilog | jobcomp (wired in slurm.conf)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["hook"]:
        from slurm_plugin.hooks import main as hook_main

        return hook_main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
