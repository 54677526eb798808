"""
The C{natkeep} command (also C{python -m natkeep}): run the service, check a
config, and look at or change a running natkeep through its status
listener.

    natkeep run [--config PATH] [--log-format json] [-- twistd natkeep options]
    natkeep check [--config PATH] [--devices N]
    natkeep passwd USER --realm REALM [--algorithm SHA-256|MD5] < password
    natkeep status
    natkeep bindings list [--aor AOR] [--source HOST[:PORT]] [--nat yes|no]
    natkeep bindings show AOR
    natkeep bindings rm AOR [--contact URI]

The last three talk to C{--status HOST:PORT}, or to the C{status} of
C{--config PATH}, with the C{admin_token} of that file (or C{--token}, or
C{$NATKEEP_ADMIN_TOKEN}); they print tables, or JSON with C{--json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional, Sequence, TextIO

from natkeep import __version__, build
from natkeep.config import ConfigError, buildSettings, parseListenAddress, readConfigFile

#: Seconds a call to the admin API may take.
TIMEOUT = 10.0


class CommandError(Exception):
    """
    What the command says on standard error before it exits 1.
    """


def _settingsOf(path: Optional[str]) -> Any:
    values: dict[str, str] = {}
    if path:
        values, _ = readConfigFile(path)
    return buildSettings(values, {})


def endpoint(arguments: argparse.Namespace) -> tuple[str, Optional[str]]:
    """
    The base URL of the status listener the arguments name, and the admin
    token to send.
    """
    token = arguments.token or os.environ.get("NATKEEP_ADMIN_TOKEN") or None
    address = arguments.status
    if address is None or token is None:
        try:
            settings = _settingsOf(arguments.config)
        except ConfigError as e:
            raise CommandError(str(e))
        address = address or settings.status
        token = token or settings.adminToken
    if not address:
        raise CommandError(
            "no status listener: give --status HOST:PORT, or --config with a status setting"
        )
    try:
        host, port = parseListenAddress(address)
    except ValueError as e:
        raise CommandError(f"--status {address!r}: {e}")
    # A listener on every address is reached on loopback.
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}", token


def call(
    base: str, token: Optional[str], method: str, path: str, query: Optional[dict[str, str]] = None
) -> Any:
    """
    One call to the admin API or status page; the decoded JSON answer.

    @raise CommandError: when it cannot be reached or refuses.
    """
    url = base + path
    if query:
        url += "?" + urllib.parse.urlencode(query)
    request = urllib.request.Request(url, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
            return json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("error", e.reason)
        except (ValueError, AttributeError):
            detail = e.reason
        raise CommandError(f"{method} {path}: {e.code} {detail}")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CommandError(f"cannot reach natkeep at {base}: {reason}")


def _table(rows: Sequence[Sequence[object]], header: Sequence[str], out: TextIO) -> None:
    cells = [list(header)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _bindingRows(bindings: Sequence[dict[str, Any]]) -> list[list[object]]:
    return [
        [
            b["aor"],
            b["contact"],
            b["source"],
            "yes" if b["nat"] else "no",
            f"{b['expires_in']}s",
            b["listener"],
        ]
        for b in bindings
    ]


_BINDING_HEADER = ("AOR", "CONTACT", "SOURCE", "NAT", "EXPIRES", "LISTENER")


def _show(arguments: argparse.Namespace, result: Any, out: TextIO) -> None:
    if arguments.json:
        json.dump(result, out, indent=2)
        out.write("\n")
        return
    command = arguments.command
    if command == "status":
        cycle = result.get("last_cycle") or {}
        out.write(f"bindings      {result['bindings']} ({result['nat_bindings']} behind NAT)\n")
        settings = result["settings"]
        out.write(
            f"heartbeats    {settings['payload']}, {settings['pacing']} pacing, "
            f"every {settings['period_s']} s, capacity {settings['capacity']}\n"
        )
        if cycle:
            out.write(
                f"last cycle    {cycle['sent']} sent to {cycle['due']} due, "
                f"{cycle['missed']} missed, {cycle['errors']} errors\n"
            )
        else:
            out.write("last cycle    none yet\n")
        for key, value in result["counters"].items():
            out.write(f"  {key:<28} {value}\n")
    elif arguments.action == "list":
        _table(_bindingRows(result["bindings"]), _BINDING_HEADER, out)
        shown = len(result["bindings"])
        out.write(
            f"{shown} of {result['total']} bindings (offset {result['offset']}, "
            f"limit {result['limit']})\n"
        )
    elif arguments.action == "show":
        _table(_bindingRows(result["bindings"]), _BINDING_HEADER, out)
    elif arguments.action == "rm":
        for uri in result["removed"]:
            out.write(f"removed {result['aor']} {uri}\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="natkeep", description="Run and manage natkeep, the SIP NAT keep-alive registrar."
    )
    parser.add_argument(
        "--version", action="version", version=f"natkeep {__version__} ({build()} build)"
    )
    parser.add_argument("--config", "-c", help="natkeep config file (status, admin_token, ...)")
    parser.add_argument("--status", help="the status listener, HOST:PORT")
    parser.add_argument("--token", help="admin token (default: the config's admin_token)")
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the service in the foreground (twistd -n)")
    run.add_argument("--log-format", choices=("text", "json"), help="default: the config's")
    run.add_argument("options", nargs=argparse.REMAINDER, help="more twistd natkeep options")

    check = commands.add_parser("check", help="check the config and print the capacity plan")
    check.add_argument("--devices", help="plan for this many NATed devices")

    commands.add_parser("status", help="what the running natkeep reports")

    passwd = commands.add_parser(
        "passwd", help="print a credentials line for USER (the password is read from stdin)"
    )
    passwd.add_argument("user")
    passwd.add_argument("--realm", required=True)
    passwd.add_argument("--algorithm", choices=("SHA-256", "MD5"), default="SHA-256")

    bindings = commands.add_parser("bindings", help="list, show or remove live bindings")
    actions = bindings.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="list bindings")
    listing.add_argument("--aor")
    listing.add_argument("--source", help="HOST or HOST:PORT ([v6]:PORT)")
    listing.add_argument("--nat", choices=("yes", "no"))
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--offset", type=int, default=0)
    show = actions.add_parser("show", help="one AOR's bindings")
    show.add_argument("aor")
    remove = actions.add_parser("rm", help="remove an AOR's bindings, or one Contact")
    remove.add_argument("aor")
    remove.add_argument("--contact", help="only this Contact URI")
    return parser


def twistdArguments(arguments: argparse.Namespace) -> list[str]:
    """
    The twistd command line C{natkeep run} stands for.
    """
    logFormat = arguments.log_format
    if logFormat is None:
        try:
            logFormat = _settingsOf(arguments.config).logFormat
        except ConfigError as e:
            raise CommandError(str(e))
    argv = ["twistd", "--nodaemon", "--pidfile="]
    if logFormat == "json":
        from natkeep.logs import JSON_LOGGER

        argv += ["--logger", JSON_LOGGER]
    argv.append("natkeep")
    if arguments.config:
        argv += ["--config", arguments.config]
    if logFormat:
        argv += ["--log-format", logFormat]
    extra = list(arguments.options)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return argv + extra


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout) -> int:
    """
    Run the C{natkeep} command; return its exit status.
    """
    arguments = _parser().parse_args(argv)
    try:
        if arguments.command == "run":
            from twisted.scripts.twistd import run

            sys.argv = twistdArguments(arguments)
            run()  # type: ignore[no-untyped-call]
            return 0
        if arguments.command == "passwd":
            from natkeep.digest import credentialsLine

            password = sys.stdin.readline().rstrip("\r\n")
            if not password:
                raise CommandError("no password on standard input")
            try:
                out.write(
                    credentialsLine(arguments.user, arguments.realm, password, arguments.algorithm)
                    + "\n"
                )
            except ValueError as e:
                raise CommandError(str(e))
            return 0
        if arguments.command == "check":
            from natkeep.tap import Options

            options = Options()
            given = ["--check"]
            if arguments.config:
                given += ["--config", arguments.config]
            if arguments.devices is not None:
                given += ["--devices", arguments.devices]
            options.parseOptions(given)
            from natkeep.plan import printPlan

            try:
                settings = options.settings()
            except ConfigError as e:
                raise CommandError(str(e))
            for warning in options.warnings:
                sys.stderr.write(f"natkeep: warning: {warning}\n")
            return printPlan(settings, options["devices"], out)
        base, token = endpoint(arguments)
        if arguments.command == "status":
            result = call(base, None, "GET", "/status")
        else:
            action = arguments.action
            if action == "list":
                query = {"limit": str(arguments.limit), "offset": str(arguments.offset)}
                for name in ("aor", "source", "nat"):
                    value = getattr(arguments, name)
                    if value is not None:
                        query[name] = value
                result = call(base, token, "GET", "/bindings", query)
            else:
                path = "/bindings/" + urllib.parse.quote(arguments.aor, safe="")
                if action == "show":
                    result = call(base, token, "GET", path)
                else:
                    contact = {"contact": arguments.contact} if arguments.contact else None
                    result = call(base, token, "DELETE", path, contact)
        _show(arguments, result, out)
        return 0
    except CommandError as e:
        sys.stderr.write(f"natkeep: error: {e}\n")
        return 1


def console() -> None:
    """
    The console script's entry point.
    """
    raise SystemExit(main())
