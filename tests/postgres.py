"""
A PostgreSQL server for the tests, from Debian's C{postgresql} package: one
per test run, started on first use in a temporary directory, listening on a
Unix socket only, and stopped when the run ends.  initdb refuses to run as
root, so as root the server runs as the C{postgres} user.  Each test gets a
database of its own.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from typing import Optional

_server: Optional["PostgreSQLServer"] = None
_failure: Optional[str] = None
_databases = 0


def _binaries() -> Optional[str]:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


def postgresUnavailable() -> Optional[str]:
    """
    Why no PostgreSQL can run here, or L{None}.
    """
    if _binaries() is None:
        return "PostgreSQL is not installed (Debian's postgresql; .ci/run installs it)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install '.[test]' brings it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root needs the postgres user (Debian's postgresql makes it)"
    return _failure


class PostgreSQLServer:
    """
    One running server: its directory, and the socket directory clients
    connect through.
    """

    def __init__(self) -> None:
        bin = _binaries()
        assert bin is not None
        self.bin = bin
        self.root = tempfile.mkdtemp(prefix="nk-pg-")
        self.data = os.path.join(self.root, "data")
        self.sockets = self.root
        self.user: Optional[str] = None
        if os.geteuid() == 0:
            self.user = "postgres"
            entry = pwd.getpwnam("postgres")
            os.chmod(self.root, 0o755)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        result = subprocess.run(
            prefix + list(command), capture_output=True, text=True, timeout=120, cwd="/"
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")

    def start(self) -> None:
        self._run(
            os.path.join(self.bin, "initdb"),
            "-D",
            self.data,
            "-A",
            "trust",
            "-U",
            "natkeep",
            "--no-sync",
        )
        self._run(
            os.path.join(self.bin, "pg_ctl"),
            "-D",
            self.data,
            "-l",
            os.path.join(self.root, "server.log"),
            "-w",
            "-o",
            f"-c listen_addresses='' -c unix_socket_directories={self.sockets} "
            "-c fsync=off -c max_connections=200",
            "start",
        )

    def stop(self) -> None:
        try:
            self._run(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", "immediate", "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def uri(self, database: str) -> str:
        return f"postgresql:///{database}?host={self.sockets}&user=natkeep"

    def createDatabase(self) -> str:
        """
        A new, empty database; its URI.
        """
        import psycopg

        global _databases
        _databases += 1
        name = f"natkeep_test_{os.getpid()}_{_databases}"
        with psycopg.connect(self.uri("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.uri(name)


def server() -> PostgreSQLServer:
    """
    The run's server, started on first use.

    @raise RuntimeError: when it cannot start (the reason is kept, and
        later callers skip with it).
    """
    global _server, _failure
    if _server is None:
        candidate = PostgreSQLServer()
        try:
            candidate.start()
        except Exception as e:
            candidate.stop()
            _failure = f"the test PostgreSQL did not start: {e}"
            raise RuntimeError(_failure)
        _server = candidate
        atexit.register(candidate.stop)
    return _server


def freshDatabase() -> str:
    """
    The URI of a new database on the run's server.
    """
    return server().createDatabase()


if __name__ == "__main__":
    # For benchmarks: a server like the suite's and a fresh database,
    # until standard input ends.
    import sys

    print(freshDatabase(), flush=True)
    sys.stdin.read()
