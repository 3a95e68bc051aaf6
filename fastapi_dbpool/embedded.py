"""A real PostgreSQL server run from the binaries shipped in the ``pgserver`` wheel.

:class:`EmbeddedPostgres` is meant for tests, demos and local development: it initialises a
cluster in a directory you choose, runs ``postgres`` listening on a TCP port (plus a Unix
socket in a private directory), and can stop it, crash it (``SIGKILL``) and start it again on
the same port.

The binaries are located without importing the ``pgserver`` package (importing it has side
effects, such as warnings from ``platformdirs`` when ``XDG_RUNTIME_DIR`` is unset), so
``pgserver.get_server`` is never called.

When the current process runs as root, PostgreSQL refuses to start, so the server runs as the
unprivileged system user ``pgserver`` (the same user the ``pgserver`` package uses), which is
created with ``useradd`` if missing. The data directory is then owned by that user, and the
parent directories of the data directory and of the ``pgserver`` install get the "others may
traverse" bit (``o+x``) where it is missing (as ``pgserver`` itself does, though it adds
``o+rx``). Keep such a data directory out of places whose permissions something else resets:
pytest sets ``/tmp/pytest-of-root`` back to mode 0700 whenever a session starts, after which
a running server PANICs at its next checkpoint (``global/pg_control: Permission denied``).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import random
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self

__all__ = ["EmbeddedPostgres", "StopMode", "find_free_port"]

logger = logging.getLogger("fastapi_dbpool")

StopMode = Literal["smart", "fast", "immediate"]

_INSTALL_HINT: Final = (
    "the embedded PostgreSQL needs the 'pgserver' package: pip install 'fastapi-dbpool[embedded]'"
)
_SYSTEM_USER: Final = "pgserver"
_SUPERUSER: Final = "postgres"
_START_TIMEOUT: Final = 30.0
_POLL_INTERVAL: Final = 0.01
_LOG_NAME: Final = "postgres.log"
# sun_path is 108 bytes including the terminating NUL on Linux (104 on macOS).
_MAX_SOCKET_PATH: Final = 100

_bin_dir_cache: Path | None = None
_bin_dir_lock = threading.Lock()
_running: weakref.WeakSet[EmbeddedPostgres] = weakref.WeakSet()


def _pgserver_bin_dir() -> Path:
    """Return the ``bin`` directory of the PostgreSQL build shipped in the ``pgserver`` wheel.

    The package is located with :func:`importlib.util.find_spec`, which does not execute
    ``pgserver/__init__.py``.
    """
    global _bin_dir_cache
    with _bin_dir_lock:
        if _bin_dir_cache is not None:
            return _bin_dir_cache
        try:
            spec = importlib.util.find_spec("pgserver")
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(_INSTALL_HINT)
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "pginstall" / "bin"
            if (candidate / "postgres").exists():
                if os.geteuid() == 0:
                    _ensure_install_readable(candidate.parent)
                _bin_dir_cache = candidate
                return candidate
        raise RuntimeError(
            f"pgserver is installed but its PostgreSQL binaries are missing; {_INSTALL_HINT}"
        )


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is currently free.

    Ports are picked below the kernel's ephemeral range when it is known, so that a port that
    is released for a moment (a server stopped to be started again) is not grabbed as the
    source port of some unrelated outgoing connection.

    Args:
        host: The address the port must be bindable on.

    Returns:
        A port number that could be bound with ``SO_REUSEADDR`` just now.
    """
    low, high = 10000, 32000
    try:
        first, _ = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        high = min(high, int(first) - 1)
    except (OSError, ValueError):
        pass
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if high - low > 1000:
        for _ in range(50):
            port = random.randint(low, high)
            if _port_bindable(family, host, port):
                return port
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port = int(sock.getsockname()[1])
    return port


def _port_bindable(family: socket.AddressFamily, host: str, port: int) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged account the server runs as when we are root."""

    name: str
    uid: int
    gid: int


def _run_as() -> _RunAs | None:
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(_SYSTEM_USER)
    except KeyError:
        logger.info("creating system user %r to run PostgreSQL (running as root)", _SYSTEM_USER)
        try:
            subprocess.run(
                ["useradd", "--system", "--shell", "/bin/false", "--no-create-home", _SYSTEM_USER],
                check=True,
                capture_output=True,
                text=True,
            )
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", None) or str(exc)
            raise RuntimeError(
                f"running as root, PostgreSQL must run as another user, and creating the system "
                f"user {_SYSTEM_USER!r} with useradd failed: {detail}"
            ) from exc
        entry = pwd.getpwnam(_SYSTEM_USER)
    return _RunAs(name=_SYSTEM_USER, uid=entry.pw_uid, gid=entry.pw_gid)


def _ensure_install_readable(install_dir: Path) -> None:
    """Make the PostgreSQL install usable by the unprivileged user (we are root)."""
    _ensure_traversable(install_dir)
    for root, dirs, files in os.walk(install_dir):
        for name in dirs:
            _add_mode(Path(root) / name, stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        executable = Path(root).name == "bin"
        for name in files:
            extra = stat.S_IRGRP | stat.S_IROTH
            if executable:
                extra |= stat.S_IXGRP | stat.S_IXOTH
            _add_mode(Path(root) / name, extra)
    _add_mode(install_dir, stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)


def _ensure_traversable(path: Path) -> None:
    """Give "others" search permission on every ancestor of ``path`` that lacks it."""
    for parent in path.resolve().parents:
        _add_mode(parent, stat.S_IXOTH)


def _add_mode(path: Path, bits: int) -> None:
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode) or mode & bits == bits:
        return
    logger.debug("chmod %s: adding %o", path, bits)
    path.chmod(stat.S_IMODE(mode) | bits)


def _psutil() -> Any:
    """Return the ``psutil`` module (a dependency of ``pgserver``) or None when missing."""
    try:
        return importlib.import_module("psutil")
    except ImportError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (Linux), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return raw.rsplit(")", 1)[-1].split()


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process."""
    psutil = _psutil()
    if psutil is not None:
        try:
            return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return False
        except psutil.Error:
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _proc_stat(pid)
    return fields is None or fields[0] != "Z"


def _child_pids(pid: int) -> list[int]:
    """Process ids of the children of ``pid`` (PostgreSQL backends do not fork further)."""
    psutil = _psutil()
    if psutil is not None:
        try:
            return [int(child.pid) for child in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    children: list[int] = []
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                fields = _proc_stat(int(entry.name))
                if fields is not None and len(fields) > 1 and fields[1] == str(pid):
                    children.append(int(entry.name))
    return children


def _is_postgres(pid: int) -> bool:
    """Whether ``pid`` runs the ``postgres`` executable (guards against pid reuse)."""
    psutil = _psutil()
    if psutil is not None:
        try:
            return bool(psutil.Process(pid).name() == "postgres")
        except psutil.Error:
            return False
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "postgres"
    except OSError:
        return True  # cannot tell: assume it is


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@dataclass(frozen=True)
class _PidFile:
    """The interesting lines of ``postmaster.pid``."""

    pid: int
    port: int | None
    status: str


def _read_pid_file(data_dir: Path) -> _PidFile | None:
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        # A standalone backend (initdb's bootstrap, --single) writes its pid negated.
        pid = abs(int(lines[0]))
    except (IndexError, ValueError):
        return None
    port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None
    status = lines[7].strip() if len(lines) > 7 else ""
    return _PidFile(pid=pid, port=port, status=status)


class EmbeddedPostgres:
    """A PostgreSQL server run as a child process from the ``pgserver`` binaries.

    The cluster lives in ``data_dir`` (``initdb`` runs on first start, with ``trust``
    authentication and the superuser ``postgres``). The server log is appended to
    ``data_dir / "postgres.log"`` (see :attr:`log_path`).

    Example:
        >>> with EmbeddedPostgres(Path(".dbpool-data"), ephemeral=True) as pg:  # doctest: +SKIP
        ...     engine = create_async_engine(pg.url())

    Thread safety: one instance must not be driven from several threads at the same time.
    Two instances (in one or several processes) must not be started on the same data
    directory at the same time; :meth:`start` stops a postmaster left over on ``data_dir`` by
    an earlier process that died without stopping it.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        max_connections: int = 100,
        extra_settings: Mapping[str, str] | None = None,
        ephemeral: bool = False,
    ) -> None:
        """Configure (but do not start) a server.

        Args:
            data_dir: The PostgreSQL data directory (``PGDATA``). Created if missing; must be
                empty or hold a cluster made by an earlier run.
            port: The TCP port to listen on. ``None`` picks a free port on first start; the
                same port is then reused by every later :meth:`start`.
            host: The address to listen on (``listen_addresses``) and to put in URLs.
            max_connections: PostgreSQL's ``max_connections``.
            extra_settings: More server settings, passed as ``-c name=value``; they win over
                every setting above.
            ephemeral: Trade durability for speed (``fsync``, ``synchronous_commit`` and
                ``full_page_writes`` off; ``initdb --no-sync``). Meant for tests. Nothing is
                safe from an operating-system crash, and :meth:`kill` loses transactions
                committed in the last fraction of a second; pass
                ``extra_settings={"synchronous_commit": "on"}`` to keep every committed
                transaction across :meth:`kill`.
        """
        self._data_dir = Path(data_dir).absolute()
        self._port = port
        self._host = host
        self._max_connections = max_connections
        self._extra_settings = dict(extra_settings or {})
        self._ephemeral = ephemeral
        self._process: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._socket_dir: Path | None = None
        self._temp_socket_dir: Path | None = None
        self._owner_pid = os.getpid()

    # ------------------------------------------------------------------ properties

    @property
    def data_dir(self) -> Path:
        """The PostgreSQL data directory."""
        return self._data_dir

    @property
    def log_path(self) -> Path:
        """The file the server's log is appended to."""
        return self._data_dir / _LOG_NAME

    @property
    def host(self) -> str:
        """The address the server listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The TCP port; chosen on first use when none was given.

        Returns:
            The port the server listens on (or will listen on once started).
        """
        if self._port is None:
            self._port = find_free_port(self._host)
        return self._port

    @property
    def socket_dir(self) -> Path | None:
        """The directory holding the Unix socket while the server runs, else ``None``."""
        return self._socket_dir if self.is_running else None

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while the server runs, else ``None``."""
        return self._pid if self.is_running else None

    @property
    def is_running(self) -> bool:
        """Whether the postmaster started (or adopted) by this object is alive."""
        if self._process is not None:
            if self._process.poll() is None:
                return True
            self._forget_process()
            return False
        if self._pid is not None:
            if _pid_alive(self._pid):
                return True
            self._forget_process()
        return False

    def url(self, database: str = "postgres", driver: str = "postgresql+asyncpg") -> str:
        """Return a connection URL for this server.

        Args:
            database: The database name.
            driver: The URL scheme: ``postgresql+asyncpg`` for SQLAlchemy, ``postgresql`` for
                asyncpg or libpq.

        Returns:
            For example ``postgresql+asyncpg://postgres@127.0.0.1:54321/postgres``.
        """
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{driver}://{_SUPERUSER}@{host}:{self.port}/{database}"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Initialise the cluster if needed and start the server; return once it accepts
        connections.

        A postmaster still running on ``data_dir`` (left by a process that died without
        stopping it) is stopped first, so the server always runs with this object's settings.
        Starting a running server does nothing.

        Returns:
            ``self``.

        Raises:
            RuntimeError: ``pgserver`` is missing, ``initdb`` failed, or the server did not
                accept connections within 30 seconds (the message includes the log's tail).
        """
        if self.is_running:
            return self
        bin_dir = _pgserver_bin_dir()
        run_as = _run_as()
        self._prepare_data_dir(run_as)
        self._stop_leftover_postmaster(bin_dir, run_as)
        if not (self._data_dir / "PG_VERSION").exists():
            self._initdb(bin_dir, run_as)
        self._launch(bin_dir, run_as)
        return self

    def stop(self, mode: StopMode = "fast", *, timeout: float = 30.0) -> None:
        """Stop the server with ``pg_ctl stop`` and wait until it has exited.

        Stopping a server that is not running does nothing. A server that has not exited
        after ``timeout`` seconds (or that ``pg_ctl`` fails to stop) is killed as by
        :meth:`kill`, with a warning logged, so that no server outlives ``stop()``.

        Args:
            mode: ``smart`` waits for clients to disconnect, ``fast`` disconnects them and
                shuts down cleanly, ``immediate`` exits without a checkpoint (crash recovery
                runs on the next start).
            timeout: Seconds to wait for the server to exit.

        Raises:
            ValueError: ``mode`` is not a known shutdown mode.
            RuntimeError: ``pg_ctl`` failed although the server has exited.
        """
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown shutdown mode {mode!r}")
        if not self.is_running:
            self._forget_process()
            return
        self._stop_or_kill(_pgserver_bin_dir(), _run_as(), mode, timeout)
        self._forget_process()

    def _stop_or_kill(
        self, bin_dir: Path, run_as: _RunAs | None, mode: StopMode, timeout: float
    ) -> None:
        try:
            self._pg_ctl_stop(bin_dir, run_as, mode, timeout)
        except RuntimeError as exc:
            if not self.is_running:
                raise
            logger.warning("%s; killing it (log: %s)", exc, self.log_path)
            self.kill()

    def kill(self) -> None:
        """Crash the server: ``SIGKILL`` the postmaster and all its child processes.

        Clients see their connections die at once; nothing is written to disk. The server can
        be started again with :meth:`start` (it runs crash recovery). Killing a server that is
        not running does nothing.
        """
        if not self.is_running or self._pid is None:
            return
        pid = self._pid
        # Freeze the postmaster so it neither forks new backends nor reacts to its children's
        # deaths while we collect and kill them.
        _signal(pid, signal.SIGSTOP)
        children = _child_pids(pid)
        _signal(pid, signal.SIGKILL)
        for child in children:
            _signal(child, signal.SIGKILL)
        if self._process is not None:
            self._process.wait()
        deadline = time.monotonic() + 10.0
        while any(_pid_alive(p) for p in [pid, *children]):
            if time.monotonic() > deadline:
                logger.warning("processes of killed PostgreSQL (pid %d) are still alive", pid)
                break
            time.sleep(_POLL_INTERVAL)
        logger.info("killed PostgreSQL (pid %d) and %d child processes", pid, len(children))
        self._forget_process()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<EmbeddedPostgres {self._data_dir} {self._host}:{self._port} {state}>"

    # ------------------------------------------------------------------ internals

    def _forget_process(self) -> None:
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=0)
        self._process = None
        self._pid = None
        self._socket_dir = None
        if self._temp_socket_dir is not None:
            with contextlib.suppress(OSError):
                for entry in self._temp_socket_dir.iterdir():
                    entry.unlink()
                self._temp_socket_dir.rmdir()
            self._temp_socket_dir = None
        _running.discard(self)

    def _subprocess_kwargs(self, run_as: _RunAs | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"cwd": self._data_dir, "env": self._child_env()}
        if run_as is not None:
            kwargs.update(user=run_as.uid, group=run_as.gid, extra_groups=[])
        return kwargs

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env.pop("LANG", None)
        return env

    def _prepare_data_dir(self, run_as: _RunAs | None) -> None:
        self._data_dir.mkdir(parents=True, exist_ok=True)
        if run_as is not None:
            _ensure_traversable(self._data_dir)
            st = self._data_dir.stat()
            if (st.st_uid, st.st_gid) != (run_as.uid, run_as.gid):
                for root, dirs, files in os.walk(self._data_dir):
                    for name in [*dirs, *files]:
                        os.lchown(Path(root) / name, run_as.uid, run_as.gid)
                os.chown(self._data_dir, run_as.uid, run_as.gid)
        if stat.S_IMODE(self._data_dir.stat().st_mode) not in (0o700, 0o750):
            self._data_dir.chmod(0o700)

    def _stop_leftover_postmaster(self, bin_dir: Path, run_as: _RunAs | None) -> None:
        info = _read_pid_file(self._data_dir)
        if info is None or not _pid_alive(info.pid):
            return
        if not _is_postgres(info.pid):
            # The pid was reused by an unrelated process (e.g. after a reboot); PostgreSQL
            # would refuse to start while the lock file names a live process.
            logger.warning(
                "removing stale %s (pid %d is not PostgreSQL)",
                self._data_dir / "postmaster.pid",
                info.pid,
            )
            (self._data_dir / "postmaster.pid").unlink(missing_ok=True)
            return
        logger.warning(
            "a PostgreSQL postmaster (pid %d, port %s) from an earlier run still runs on %s; "
            "stopping it",
            info.pid,
            info.port,
            self._data_dir,
        )
        self._pid = info.pid
        try:
            self._stop_or_kill(bin_dir, run_as, "fast", 30.0)
        finally:
            self._pid = None

    def _initdb(self, bin_dir: Path, run_as: _RunAs | None) -> None:
        entries = [p.name for p in self._data_dir.iterdir() if p.name != _LOG_NAME]
        if entries:
            listing = ", ".join(sorted(entries))
            raise RuntimeError(
                f"{self._data_dir} has no PG_VERSION but is not empty ({listing}); "
                "refusing to run initdb there"
            )
        log_file = self.log_path
        if log_file.exists():
            log_file.unlink()
        args = [
            str(bin_dir / "initdb"),
            "--pgdata",
            str(self._data_dir),
            "--username",
            _SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--no-instructions",
        ]
        if self._ephemeral:
            args.append("--no-sync")
        logger.info("initdb %s", self._data_dir)
        started = time.monotonic()
        result = subprocess.run(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
            timeout=120,
            **self._subprocess_kwargs(run_as),
        )
        if result.returncode != 0:
            output = result.stdout.decode(errors="replace")
            raise RuntimeError(
                f"initdb failed for {self._data_dir} (exit code {result.returncode}):\n{output}"
            )
        logger.debug("initdb took %.2f s", time.monotonic() - started)

    def _choose_socket_dir(self, run_as: _RunAs | None) -> Path:
        candidate = self._data_dir
        if len(str(candidate / f".s.PGSQL.{self.port}")) <= _MAX_SOCKET_PATH:
            return candidate
        digest = hashlib.sha256(str(self._data_dir).encode()).hexdigest()[:8]
        temp = Path(tempfile.mkdtemp(prefix=f"dbpool-pg-{digest}-"))
        if run_as is not None:
            _ensure_traversable(temp)
            os.chown(temp, run_as.uid, run_as.gid)
        self._temp_socket_dir = temp
        return temp

    def _command_line(self, bin_dir: Path, socket_dir: Path) -> list[str]:
        settings: dict[str, str] = {
            "listen_addresses": self._host,
            "port": str(self.port),
            "unix_socket_directories": str(socket_dir),
            "max_connections": str(self._max_connections),
            "logging_collector": "off",
        }
        if self._ephemeral:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        settings.update(self._extra_settings)
        args = [str(bin_dir / "postgres"), "-D", str(self._data_dir)]
        for name, value in settings.items():
            args += ["-c", f"{name}={value}"]
        return args

    def _launch(self, bin_dir: Path, run_as: _RunAs | None) -> None:
        socket_dir = self._choose_socket_dir(run_as)
        args = self._command_line(bin_dir, socket_dir)
        log_path = self.log_path
        with log_path.open("ab") as log:
            log_offset = log.tell()
            if run_as is not None:
                os.fchown(log.fileno(), run_as.uid, run_as.gid)
            logger.info(
                "starting PostgreSQL on %s:%d (data %s)", self._host, self.port, self._data_dir
            )
            process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._subprocess_kwargs(run_as),
            )
        self._process = process
        self._pid = process.pid
        self._socket_dir = socket_dir
        self._owner_pid = os.getpid()
        _running.add(self)
        try:
            self._wait_ready(process, log_path, log_offset)
        except BaseException:
            if process.poll() is None:
                process.kill()
                process.wait()
            self._forget_process()
            raise

    def _wait_ready(self, process: subprocess.Popen[bytes], log_path: Path, offset: int) -> None:
        started = time.monotonic()
        deadline = started + _START_TIMEOUT
        while True:
            code = process.poll()
            if code is not None:
                raise RuntimeError(
                    f"PostgreSQL exited with code {code} while starting on "
                    f"{self._host}:{self.port}; log tail ({log_path}):\n"
                    f"{_log_tail(log_path, offset)}"
                )
            info = _read_pid_file(self._data_dir)
            ready = info is not None and info.pid == process.pid and info.status == "ready"
            if ready and self._accepts_tcp():
                logger.info(
                    "PostgreSQL ready on %s:%d after %.2f s",
                    self._host,
                    self.port,
                    time.monotonic() - started,
                )
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"PostgreSQL did not accept connections on {self._host}:{self.port} within "
                    f"{_START_TIMEOUT:.0f} s; log tail ({log_path}):\n{_log_tail(log_path, offset)}"
                )
            time.sleep(_POLL_INTERVAL)

    def _accepts_tcp(self) -> bool:
        try:
            with socket.create_connection((self._host, self.port), timeout=1.0):
                return True
        except OSError:
            return False

    def _pg_ctl_stop(
        self, bin_dir: Path, run_as: _RunAs | None, mode: StopMode, timeout: float
    ) -> None:
        pid = self._pid
        args = [
            str(bin_dir / "pg_ctl"),
            "stop",
            "--pgdata",
            str(self._data_dir),
            "--mode",
            mode,
            "--wait",
            "--timeout",
            str(max(1, int(timeout))),
            "--silent",
        ]
        logger.info("stopping PostgreSQL (pid %s, mode %s) on %s", pid, mode, self._data_dir)
        result = subprocess.run(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
            timeout=timeout + 10,
            **self._subprocess_kwargs(run_as),
        )
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=timeout)
        still_alive = pid is not None and (
            self._process.poll() is None if self._process is not None else _pid_alive(pid)
        )
        if result.returncode != 0 or still_alive:
            output = result.stdout.decode(errors="replace").strip()
            if not still_alive and "Is server running?" in output:
                return  # it went away on its own
            raise RuntimeError(
                f"pg_ctl stop -m {mode} failed for {self._data_dir} (exit code "
                f"{result.returncode}, server {'still running' if still_alive else 'stopped'}): "
                f"{output}"
            )


def _log_tail(path: Path, offset: int, limit: int = 4000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError as exc:
        return f"<cannot read log: {exc}>"
    text = data.decode(errors="replace")
    if len(text) > limit:
        text = "...\n" + text[-limit:]
    return text or "<empty>"


def _stop_all_at_exit() -> None:
    for server in list(_running):
        if server._owner_pid != os.getpid():
            continue  # a forked child exiting: the server belongs to the parent
        try:
            server.stop("fast", timeout=10.0)
        except Exception:  # pragma: no cover - best effort at interpreter exit
            logger.exception("could not stop %r at exit", server)


atexit.register(_stop_all_at_exit)
