"""A throwaway PostgreSQL server for the tests: its own cluster in a temporary folder, on a free
loopback port, trust auth, fsync off; stopped and deleted at the end of the session.

Uses the server binaries of the Debian/Ubuntu ``postgresql`` package (/usr/lib/postgresql/*/bin),
which ``scripts/test`` installs. Without them the PostgreSQL tests skip (they fail under CI=true,
where the package is always installed). PostgreSQL refuses to run as root, so as root the cluster
is owned by and run as the ``postgres`` user the package creates.
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

USER = "postgres"  # the cluster's superuser (initdb -U), whoever runs the server
DATABASE = "parley"


def _bin_dir() -> Path | None:
    """The newest installed server's bin folder, or None."""
    found = [Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin") if (Path(d) / "initdb").exists()]
    found.sort(key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    return found[-1] if found else None


def _scratch() -> str | None:
    """Where the cluster goes: RAM (/dev/shm) when it has room, since creating a database there takes
    ~10 ms against ~200 ms on a virtual disk even with fsync off; else /tmp as root (the postgres
    user must reach it, and TMPDIR may be private to root); else the usual temporary folder. All
    three keep the unix socket path short."""
    try:
        if os.access("/dev/shm", os.W_OK | os.X_OK) and shutil.disk_usage("/dev/shm").free >= 1 << 30:
            return "/dev/shm"
    except OSError:
        pass
    return "/tmp" if os.geteuid() == 0 else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="parley-pg-", dir=_scratch()))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self.major = int(bin_dir.parent.name) if bin_dir.parent.name.isdigit() else 0  # Debian: .../15/bin
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user to run PostgreSQL as") from None
            self.as_user = ["runuser", "-u", "postgres", "--"] if shutil.which("runuser") else ["su", "postgres"]
            os.chown(self.root, owner.pw_uid, owner.pw_gid)

    def _run(self, *args: str, timeout: float = 60, server_side: bool = True) -> subprocess.CompletedProcess:
        if not (server_side and self.as_user):
            cmd = list(args)
        elif self.as_user[0] == "su":
            cmd = [*self.as_user, "-s", "/bin/sh", "-c", shlex.join(args)]
        else:
            cmd = [*self.as_user, *args]
        # Output to a file, not a pipe: a pipe held open by the detached postmaster would hang us.
        with tempfile.TemporaryFile() as out:
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=timeout, cwd=self.root)
            out.seek(0)
            done.stdout = out.read().decode(errors="replace")
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{self._log_tail()}")
        return done

    def _log_tail(self) -> str:
        try:
            return "server log:\n" + self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def start(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync", timeout=120)
        for attempt in range(3):  # the free port can be taken between choosing it and binding it
            self.port = _free_port()
            options = (f"-k {self.root} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off -c autovacuum=off")
            try:
                # -w -t: pg_ctl polls until the server accepts connections, for at most 60 s.
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                          "-w", "-t", "60", "start", timeout=90)
                break
            except RuntimeError:
                if attempt == 2 or "could not bind" not in self._log_tail():
                    raise
        self._run(str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-t", "30",
                  timeout=40, server_side=False)
        self.psql(f'CREATE DATABASE "{DATABASE}"')

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-t", "30",
                          "stop", timeout=60)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def psql(self, sql: str) -> None:
        self._run(str(self.bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                  "-p", str(self.port), "-U", USER, "-d", "postgres",
                  "-c", sql, timeout=60, server_side=False)

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql+asyncpg://{USER}@127.0.0.1:{self.port}/{database}"


_servers: dict[str, _Server] = {}  # postgres_url -> its server, for create_database / drop_database


@pytest.fixture(scope="session")
def postgres_url():
    """An asyncpg URL to an empty database on a private PostgreSQL server started for this session."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        reason = "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin (apt-get install postgresql)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(reason + "; under CI the PostgreSQL tests must run")
        pytest.skip(reason=reason)
    server = _Server(bin_dir)
    try:
        server.start()
        url = server.url()
        _servers[url] = server
        yield url
    finally:
        _servers.pop(server.url(), None)
        server.stop()


def create_database(postgres_url: str) -> str:
    """A fresh empty database on the ``postgres_url`` server; its URL."""
    server = _servers[postgres_url]
    name = "t_" + secrets.token_hex(6)
    # Copying template1's files beats PostgreSQL 15's default (WAL_LOG: the whole copy goes through WAL).
    server.psql(f'CREATE DATABASE "{name}"' + (" STRATEGY = FILE_COPY" if server.major >= 15 else ""))
    return server.url(name)


def drop_database(postgres_url: str, url: str) -> None:
    server = _servers[postgres_url]
    name = url.rsplit("/", 1)[1]
    server.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
