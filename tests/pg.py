"""A throwaway PostgreSQL server for the tests (a pytest plugin, loaded by tests/conftest.py).

`pg_server` (session): a server of the session's own, started from the installed binaries (Debian's
`postgresql` package: /usr/lib/postgresql/<version>/bin, or `initdb` and `postgres` on PATH; KEEL_PG_BIN
names another directory) in a temporary directory, on a free loopback port with its unix socket in that
directory, stopped and removed at the end. initdb and postgres refuse to run as root: run as root (as CI
is), they run as the `postgres` user (`nobody` where there is none), which owns the directory.
`KEEL_TEST_PG_URL` (a SQLAlchemy URL of a database on a server you run) uses that server instead.

`pg_url`: a fresh, empty database on it for one test (dropped after), as a SQLAlchemy URL
(`postgresql+psycopg://...`). `any_db_url`: parametrized, a fresh SQLite file and then a fresh PostgreSQL
database, for a test that must hold on both. A test module's own `db_url` fixture that builds its URL
with `database_url(request, tmp_path)` runs on SQLite, and on both for a test marked `@on_both_databases`.

Without the driver (`pip install -e '.[postgres]'`) or the server binaries, every test that asks for
these fixtures is skipped, the reason saying what to install (shown in pytest's summary).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

DIALECTS = ("sqlite", "postgresql")
"""The databases a test of `any_db_url` runs on, in order (its ids)."""
START_TIMEOUT_S = 60.0
USER = "keel"
"""The server's superuser (trust authentication: a throwaway server on loopback and a private socket)."""
SERVER_SETTINGS = {
    # Nothing here survives the session: durability buys nothing and costs seconds.
    "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
    "max_connections": "300", "shared_buffers": "32MB", "listen_addresses": "127.0.0.1",
}


def _skip_reason() -> str | None:
    if importlib.util.find_spec("psycopg") is None:
        return "PostgreSQL tests skipped: the driver is not installed (pip install -e '.[postgres]')"
    if os.environ.get("KEEL_TEST_PG_URL"):
        return None
    if find_bin() is None:
        return ("PostgreSQL tests skipped: no server binaries (initdb, postgres) in KEEL_PG_BIN, on PATH or in "
                "/usr/lib/postgresql/*/bin: install Debian's postgresql package (apt-get install postgresql), "
                "or set KEEL_TEST_PG_URL to a database of a server you run")
    return None


def find_bin() -> Path | None:
    """The directory holding `initdb` and `postgres` of one PostgreSQL version, newest first."""
    candidates: list[Path] = []
    if os.environ.get("KEEL_PG_BIN"):
        candidates.append(Path(os.environ["KEEL_PG_BIN"]))
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)  # Debian links /usr/bin or /usr/local/bin to its own dir
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _version(p.parent.name), reverse=True)
    candidates += versions
    return next((d for d in candidates if (d / "initdb").is_file() and (d / "postgres").is_file()), None)


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split(".") if p.isdigit())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    """A running server: `url(name)` of a database on it, `create_database()` a fresh one."""

    admin_url: URL
    """A database to connect to for CREATE and DROP DATABASE."""
    created: list[str] = field(default_factory=list)

    def url(self, database: str) -> str:
        return self.admin_url.set(database=database).render_as_string(hide_password=False)

    def create_database(self, prefix: str = "keel_test") -> str:
        """A fresh empty database; its SQLAlchemy URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by create_database, closing the connections still open on it."""
        name = make_url(url).database
        assert name in self.created, name
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.remove(name)

    def _admin(self, sql: str) -> None:
        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(sql))
        finally:
            engine.dispose()


def _as_user() -> dict[str, object]:
    """Popen arguments that drop root: initdb and postgres refuse to run as root."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [],
                    "env": {**os.environ, "HOME": str(tempfile.gettempdir()), "USER": name, "LOGNAME": name}}
    raise RuntimeError("running as root, and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL as")


def _run(args: list[str], cwd: Path, log: Path, user: dict[str, object]) -> None:
    with log.open("ab") as out:
        done = subprocess.run(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=False, **user)  # type: ignore[call-overload]
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}:\n{log.read_text(errors='replace')[-3000:]}")


def _wait_ready(proc: subprocess.Popen[bytes], url: URL, log: Path) -> None:
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            psycopg.connect(host=url.host, port=url.port, user=url.username, dbname=url.database,
                            connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready after {START_TIMEOUT_S:.0f} s:\n"
                                   f"{log.read_text(errors='replace')[-3000:]}") from None
            time.sleep(0.1)


@contextlib.contextmanager
def running_server() -> Iterator[PgServer]:
    """Start a throwaway server (see the module docstring) and stop it at the end."""
    bindir = find_bin()
    if bindir is None:
        raise RuntimeError(_skip_reason() or "no PostgreSQL binaries")
    user = _as_user()
    # Under /tmp as root: the directory must be reachable by the server's user (pytest's own is root's only).
    root = Path(tempfile.mkdtemp(prefix="keel-pg-", dir="/tmp" if user else None))
    data, log = root / "data", root / "server.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        if user:
            os.chown(root, int(user["user"]), int(user["group"]))  # type: ignore[call-overload]
        _run([str(bindir / "initdb"), "-D", str(data), "-U", USER, "-A", "trust", "-E", "UTF8", "--locale=C",
              "--no-sync"], root, log, user)
        for _attempt in range(5):  # another process may take the free port before the server binds it
            port = _free_port()
            args = [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root)]
            for k, v in SERVER_SETTINGS.items():
                args += ["-c", f"{k}={v}"]
            out = log.open("ab")
            proc = subprocess.Popen(args, cwd=root, stdout=out, stderr=subprocess.STDOUT, **user)  # type: ignore[call-overload]
            out.close()
            url = URL.create("postgresql+psycopg", username=USER, host="127.0.0.1", port=port, database="postgres")
            try:
                _wait_ready(proc, url, log)
                break
            except RuntimeError:
                if proc.poll() is None or "could not bind" not in log.read_text(errors="replace"):
                    raise
        else:
            raise RuntimeError(f"postgres could not bind a port:\n{log.read_text(errors='replace')[-3000:]}")
        yield PgServer(admin_url=url)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # fast shutdown: clients disconnected, no checkpoint wait
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    external = os.environ.get("KEEL_TEST_PG_URL")
    if external:
        yield PgServer(admin_url=make_url(external))
        return
    with running_server() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh PostgreSQL database for this test, dropped after it."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


@pytest.fixture(params=DIALECTS)
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database, once on SQLite (a file in tmp_path) and once on PostgreSQL (skipped without it)."""
    return database_url(request, tmp_path)


def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """For a fixture of a fresh database: SQLite (a file in tmp_path), or PostgreSQL when the fixture runs
    with the param "postgresql" (`on_both_databases`, or `params=DIALECTS`)."""
    if getattr(request, "param", "sqlite") == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return f"sqlite:///{tmp_path / 'keel.db'}"


on_both_databases = pytest.mark.parametrize("db_url", DIALECTS, indirect=True)
"""Runs a test whose `db_url` fixture takes its URL from `database_url` on SQLite, then on PostgreSQL."""
