"""The warm worker: model steps run in a process forked from a server that has imported torch once.

Every Snakemake job is a fresh ``python``, and a model step spends seconds importing torch,
transformers and peft before a second of work; with one-layer capture blocks a chain of jobs pays
that once per layer, and every ``snakemake`` run once more. So the first job that needs a model
starts a server that imports them (and nothing more: no thread pool, no CUDA, no tokenizer runs
before a fork), and every model job is then forked from it in milliseconds, in this run and in the
next ones, until ``LAYERSCOPE_WORKER_IDLE_S`` (default 600) seconds pass without a step.

The job's own process (the client) stays what Snakemake started and waits for: it sends the
server the step (module and name), its keyword arguments (JSON), its working directory, its whole
environment, its import path, its log path and its stdin/stdout/stderr (SCM_RIGHTS). The server
forks a child that takes all of those on, resets its signal handlers and runs the step as
``steps.run_step`` does in a process of its own; the client exits with the child's status. SIGTERM
and SIGINT sent to the client reach the child (through the server, which knows when the child has
ended); the child watches the client, so a client killed outright (SIGKILL) stops it too, with the
usual clean-up.

A server is named by a key of the environment it imported: interpreter, flags, import path, the
package's location, the environment variables read at import time, the preload list and a code
stamp (every ``.py`` file of this package, the files and distributions of the preloaded modules),
so a job never gets a server that imported other code: after ``pip install -U transformers`` or an
edit of LayerScope the old server gets no more jobs and idles out. Its files (unix socket, start
lock, log, and a pid file it holds an flock on while it lives) are in a private (0700) directory;
a flock'ed start lock makes two jobs starting at once, of one snakemake or two, start one server.
The server accepts only its own user (SO_PEERCRED); ``python -m layerscope worker status|stop``
lists and stops this user's servers. With ``LAYERSCOPE_WORKER_IDLE_S=0``, and under SLURM (a
process must not outlive its SLURM job), a server serves one Snakemake process and exits a few
seconds after it does (or after 60 s without a job), as before.

Wherever it cannot be used (``LAYERSCOPE_WORKER=0``, not Linux, no fork or unix sockets, not run by
Snakemake, no private directory, arguments that are not JSON, a server that failed to start, or no
server running for a step that only joins one) the step runs in its own process as before, and
the job log says why in one line.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import gc
import glob
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

from layerscope.logs import setup_logging
from layerscope.watchdog import exit_with_process, job_owner, process_start

log = logging.getLogger("layerscope.worker")

SWITCH = "LAYERSCOPE_WORKER"  # "0" turns the worker off
IDLE = "LAYERSCOPE_WORKER_IDLE_S"  # seconds a server waits for its next step; "0": a server per snakemake
IDLE_S = 600.0
RUN_IDLE_S = 60.0  # the longest a server of one snakemake waits for its next step
PROTOCOL = 2
START_S = 60.0  # how long a client waits for a new server's socket
GRACE_S = 10.0  # how long a server whose Snakemake is gone waits for its children to end
STOP_WAIT_S = 60.0  # how long `worker stop` waits for servers to finish their steps
_MAX_MSG = 64 << 20
_HEADER = struct.Struct("!I")
_STATE_BYTES = 8192  # a pid file's JSON (a log path of PATH_MAX fits), padded: rewritten in place with one write
# Variables some library reads when it is imported (so in the server, once); a job with other
# values needs another server. Thread counts are left out: Snakemake sets them per job, and the
# child applies them itself (torch.set_num_threads) before the step runs.
_IMPORT_ENV = ("PYTHON", "LD_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "PEFT_", "KMP_",
               "MKL_", "OMP_", "OPENBLAS_", "XDG_CACHE_HOME", "ZARR_")
_PER_JOB_ENV = {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"}
_TUPLE = "__tuple__"
_FILES = (".sock", ".lock", ".log", ".refused", ".pid")


class Unavailable(Exception):
    """The worker cannot run this step (nothing has run); the message says why. ``warn``: the
    reason is a setting to fix, not a circumstance."""

    def __init__(self, why: str, warn: bool = False):
        super().__init__(why)
        self.warn = warn


def warm(fn: Callable | None = None, *, when: Callable[[dict], bool] | None = None, start: bool = True,
         prestart: bool = False) -> Callable:
    """Mark a step to run in the warm worker; ``when(kwargs)`` decides per call (e.g. only a
    built-in model needs torch to be fetched); ``start=False``: only in a server that is running
    already, never starting one (a step that needs no torch must not wait for its import);
    ``prestart``: where the step runs in its own process, it starts a server in the background
    for the model steps that follow it (see ``prestart``)."""
    def mark(f: Callable) -> Callable:
        f.__layerscope_warm__ = (when, start, prestart)
        return f

    return mark(fn) if fn is not None else mark


def wanted(fn: Callable, kwargs: dict) -> bool:
    """Whether ``fn`` called with ``kwargs`` is a warm step."""
    mark = getattr(fn, "__layerscope_warm__", None)
    return mark is not None and (mark[0] is None or bool(mark[0](kwargs)))


def starts(fn: Callable) -> bool:
    """Whether warm step ``fn`` may start a server, not only join a running one."""
    return getattr(fn, "__layerscope_warm__", (None, False, False))[1]


def prestarts(fn: Callable) -> bool:
    """Whether step ``fn``, run in its own process, starts a server for the model steps after it."""
    return getattr(fn, "__layerscope_warm__", (None, False, False))[2]


# ---------------------------------------------------------------------------------------------
# The client: the job's own process


def run(log_path: str, fn: Callable, kwargs: dict, runner: Callable, preload: list[str]) -> int:
    """Run ``runner(log_path, fn, kwargs, note)`` in a child of the warm server; returns the exit
    status this process should exit with. Raises Unavailable, having run nothing, where the worker
    cannot be used."""
    _check_usable()
    request = {"protocol": PROTOCOL, "fn": _ref(fn), "runner": _ref(runner), "kwargs": _to_json(kwargs, "kwargs"),
               "cwd": os.getcwd(), "env": dict(os.environ), "argv": sys.argv, "path": sys.path, "umask": _umask(),
               "log": os.path.abspath(log_path), "pid": os.getpid()}
    paths, server = _server_for(preload)
    for attempt in (1, 2):  # once more if a server closed (idle) just as this job connected
        with _connect(paths, server, starts(fn)) as sock:
            try:
                return _call(sock, request, log_path)
            except _Closed:
                if attempt == 2:
                    raise Unavailable(f"the warm worker closed before running the step (its log: {paths.log})")
    raise AssertionError("unreachable")


def prestart(preload: list[str]) -> threading.Thread | None:
    """Start this environment's server in the background if none is up, for the model steps that
    follow the calling one (a model fetched from a directory or the hub, its data tokenized): its
    imports then overlap the calling step's work instead of delaying the first model step. Returns
    the thread starting it, which holds the start lock until the server listens: join it before
    this process exits. None where there is nothing to start: a server is up (or starting), the
    worker cannot be used here, or it could not outlive this job (under SLURM each job has its own)."""
    try:
        _check_usable()
        if os.environ.get("SLURM_JOB_ID"):
            return None
        paths, server = _server_for(preload)
        if (s := _try_connect(paths.sock)) is not None:
            s.close()
            return None
    except Unavailable:
        return None

    def start() -> None:
        with contextlib.suppress(Unavailable, OSError), _connect(paths, server, True):
            pass  # connected: it listens (and imports); it closes this connection once it serves

    t = threading.Thread(target=start, name="layerscope-worker-prestart", daemon=True)
    t.start()
    return t


def _server_for(preload: list[str]) -> tuple[_Paths, dict]:
    """The files of the server this job would use, and what starting one takes; Unavailable where
    the worker cannot be used."""
    owner = job_owner()
    if owner is None or not _is_snakemake(owner):
        raise Unavailable("this job was not started by snakemake")
    idle = _idle_s()
    # A server of this snakemake only: asked for, or under SLURM, where a process that outlives its
    # SLURM job escapes the job's accounting and limits (or is killed with it half-way).
    bound = owner if idle == 0 or os.environ.get("SLURM_JOB_ID") else None
    if bound is not None:
        idle = min(idle or RUN_IDLE_S, RUN_IDLE_S)
    key, path = _key(preload, idle)
    paths = _Paths(runtime_dir(), key if bound is None else f"{bound}-{key}")
    server = {"path": path, "dir": str(paths.dir), "stem": paths.stem, "owner": bound,
              "owner_start": process_start(bound) if bound is not None else None, "preload": preload, "idle_s": idle}
    return paths, server


class _Closed(Exception):
    """The server closed the connection before it started the step."""


def _check_usable() -> None:
    if os.environ.get(SWITCH, "1").strip() == "0":
        raise Unavailable(f"{SWITCH}=0")
    if not sys.platform.startswith("linux"):
        raise Unavailable(f"not on Linux ({sys.platform})")
    if not (hasattr(os, "fork") and hasattr(socket, "AF_UNIX") and hasattr(socket, "SO_PEERCRED")
            and hasattr(socket, "send_fds")):
        raise Unavailable("no fork, unix sockets or SCM_RIGHTS here")


def _ref(fn: Callable) -> list[str]:
    """``[module, qualified name]``, which the server imports; refused for what it could not import."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    target = sys.modules.get(module) if module and module != "__main__" else None
    for part in name.split("."):
        target = getattr(target, part, None)
    if target is not fn:
        raise Unavailable(f"{module}.{name} cannot be imported by name")
    return [module, name]


def _to_json(value: Any, where: str) -> Any:
    """``value`` as JSON, tuples tagged so they come back as tuples; Unavailable for anything else."""
    if value is None or type(value) in (bool, int, str):
        return value
    if isinstance(value, str):
        return str.__str__(value)  # a str subclass (Snakemake's file names) as a plain str
    if isinstance(value, float) and type(value) is float:
        if value != value or value in (float("inf"), float("-inf")):
            raise Unavailable(f"{where} is {value}, not JSON")
        return value
    if isinstance(value, tuple) and type(value) is tuple:
        return {_TUPLE: [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(type(k) is str for k in value) or _TUPLE in value:
            raise Unavailable(f"{where} has keys JSON cannot carry")
        return {k: _to_json(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise Unavailable(f"{where} is a {type(value).__name__}, not JSON")


def _from_json(value: Any) -> Any:
    return json.loads(json.dumps(value), object_hook=lambda d: tuple(d[_TUPLE]) if d.keys() == {_TUPLE} else d)


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _is_snakemake(pid: int) -> bool:
    """Whether process ``pid`` runs snakemake (``snakemake ...``, ``python -m snakemake ...``)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:4]
    except OSError:
        return False
    return any(os.path.basename(a.decode(errors="replace")) == "snakemake" for a in args)


def runtime_dir() -> Path:
    """A directory only this user can enter: ``$XDG_RUNTIME_DIR/layerscope``, else
    ``<temp dir>/layerscope-<uid>``."""
    uid, last = os.getuid(), ""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    for d in ([Path(xdg) / "layerscope"] if xdg and os.path.isdir(xdg) else []) + \
             [Path(tempfile.gettempdir()) / f"layerscope-{uid}"]:
        try:
            with contextlib.suppress(FileExistsError):
                d.mkdir(mode=0o700)
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
                raise OSError(f"not a directory of uid {uid}")
            if st.st_mode & 0o077:
                os.chmod(d, 0o700)
            return d
        except OSError as e:
            last = f"{d}: {e}"
    raise Unavailable(f"no private directory for its socket ({last})")


def _key(preload: list[str], idle_s: float) -> tuple[str, list[str]]:
    """What a server's imports depend on (interpreter, import path, package, import-time
    environment, the code itself) and its idle timeout, hashed; and the import path it uses."""
    import layerscope

    path, stamp = _code(preload)
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(_IMPORT_ENV) and k not in _PER_JOB_ENV)
    blob = [PROTOCOL, sys.executable, sys.version, list(sys.flags), path, os.path.dirname(layerscope.__file__),
            preload, env, idle_s, stamp]
    return hashlib.sha256(json.dumps(blob).encode()).hexdigest()[:16], path


def _code(preload: list[str]) -> tuple[list[str], list]:
    """The import path a server for this job imports with, and the stamp of the code it would import.

    Servers are shared by every work directory (and every snakemake run) of one environment, not
    one per directory: of the job's ``sys.path`` they take only what decides where the preloaded
    modules come from. A Snakemake ``script:`` job starts as ``python <workdir>/.snakemake/scripts/
    tmpXXXX.NAME.py``; that first entry holds nothing but Snakemake's temporary copies of scripts,
    which no import finds under a library's name, so it is left out (any other first entry, the
    working directory of a ``python -c`` job say, stays in the key). Snakemake's preamble then
    appends its own search path, with a source-cache directory new in every run; entries after the
    last one a preloaded package comes from can only add modules that no earlier entry has, so they
    are left out too. The child runs the step with the job's whole ``sys.path`` (sent with the
    request), so the step's own imports are those of a process of its own.

    The stamp, found without importing anything (about 4 ms on a 2-core machine, 0.5 ms of it
    the package's 71 files): (mtime_ns, size) of every ``.py`` file of this package; for each other
    preloaded module its file and its distribution's ``.dist-info`` (reinstalled: a new mtime);
    and for each directory they come from, the ``.dist-info`` names in it, which carry the version
    of everything installed there (an upgraded dependency of transformers too).
    """
    import layerscope

    pkg = os.path.dirname(layerscope.__file__)
    stamp: list = [[os.path.relpath(f, pkg), st.st_mtime_ns, st.st_size] for f, st in _py_files(pkg)]
    full = [os.path.abspath(p) for p in sys.path]  # "" and relative entries mean the client's cwd
    first = 1 if full and Path(full[0]).parts[-2:] == (".snakemake", "scripts") else 0
    dists = {os.path.dirname(pkg): _dist_infos(os.path.dirname(pkg))}  # directory -> its .dist-info names
    found: dict[str, list] = {}  # top-level module -> [its directory or file, its stamp]
    for name in preload:
        top, _, rest = name.partition(".")
        if top == "layerscope":
            continue
        if top not in found:
            try:
                spec = importlib.util.find_spec(top)
            except (ImportError, ValueError):
                spec = None
            locs = list(spec.submodule_search_locations or []) if spec is not None else []
            origin = spec.origin if spec is not None and spec.has_location else None
            found[top] = [locs[0] if locs else origin, [_stat(origin)]]
            if origin is not None:
                entry = os.path.dirname(found[top][0])
                names = dists.setdefault(entry, _dist_infos(entry))
                found[top][1] += [_stat(os.path.join(entry, n)) for n in names
                                  if n.split("-", 1)[0].lower() == top.lower()]
        if rest and found[top][0] and os.path.isdir(found[top][0]):
            sub = os.path.join(found[top][0], *rest.split("."))
            found[top][1].append(_stat(sub + ".py") or _stat(os.path.join(sub, "__init__.py")))
    stamp += sorted([top, *facts] for top, (_, facts) in found.items()) + sorted(dists.items())
    # An entry's first occurrence is where imports find what it has (Snakemake appends site-packages
    # again, after the directory it was started in).
    last = max((full.index(p, first) + 1 for p in dists if p in full[first:]), default=len(full))
    return full[first:last], stamp


def _py_files(d: str) -> Iterator[tuple[str, os.stat_result]]:
    for e in os.scandir(d):
        if e.is_dir(follow_symlinks=False) and e.name != "__pycache__":
            yield from _py_files(e.path)
        elif e.name.endswith(".py"):
            yield e.path, e.stat()


def _stat(path: str | None) -> list | None:
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return st and [path, st.st_mtime_ns, st.st_size]


def _dist_infos(d: str) -> list[str]:
    """The ``NAME-VERSION.dist-info`` directories in ``d``."""
    try:
        return sorted(n for n in os.listdir(d) if n.endswith(".dist-info"))
    except OSError:
        return []


class _Paths:
    """The files of one key's servers: socket, start lock, log, the reason it refused to serve, and
    one pid file per server (``STEM.PID.pid``), locked by its server while it lives."""

    def __init__(self, d: Path, stem: str):
        self.dir, self.stem = d, stem
        self.sock, self.lock, self.log = d / f"{stem}.sock", d / f"{stem}.lock", d / f"{stem}.log"
        self.refused = d / f"{stem}.refused"
        if len(os.fsencode(self.sock)) > 107:
            raise Unavailable(f"its socket path is too long for a unix socket: {self.sock}")

    def pidfile(self, pid: int) -> Path:
        return self.dir / f"{self.stem}.{pid}.pid"


def _try_connect(path: Path) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        s.close()
        return None
    uid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
    if uid != os.getuid():
        s.close()
        raise Unavailable(f"{path} belongs to another user")
    return s


def _connect(paths: _Paths, server: dict, start: bool) -> socket.socket:
    """Connect to the server of this key, starting it first if there is none (and ``start``)."""
    if not start:
        # A server still importing would keep a step that needs none of it waiting for seconds.
        if not any(s["state"] == "serving" for s in servers(paths.dir, paths.stem)):
            raise Unavailable("no warm worker is ready, and this step does not start one")
        if (s := _try_connect(paths.sock)) is not None:
            return s
        raise Unavailable("no warm worker is running, and this step does not start one")
    if (s := _try_connect(paths.sock)) is not None:
        return s
    with _locked(paths.lock):  # one job at a time starts a server; the others then connect
        if (s := _try_connect(paths.sock)) is not None:
            return s
        if (why := _refusal(paths.refused)) is not None:
            raise Unavailable(f"the warm worker refused to serve: {why}")
        _sweep(paths.dir)
        with contextlib.suppress(FileNotFoundError):
            paths.sock.unlink()  # a server that died without removing it
        boot = ("import json, sys; a = json.loads(sys.argv[1]); sys.path[:] = a['path']; "
                "from layerscope.worker import serve; serve(a)")
        with open(paths.log, "ab") as out:
            # Its own session (Snakemake's signals to this job's group are not for it), no stdio of
            # this job (Snakemake would wait for the pipes to close), this interpreter's flags.
            proc = subprocess.Popen([sys.executable, *subprocess._args_from_interpreter_flags(), "-c", boot,
                                     json.dumps(server)], stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd="/",
                                    start_new_session=True)
        deadline = time.monotonic() + START_S
        while (s := _try_connect(paths.sock)) is None:
            if proc.poll() is not None:
                raise Unavailable(f"the warm worker exited at start (status {proc.returncode}; its log: {paths.log})")
            if time.monotonic() > deadline:
                proc.kill()
                raise Unavailable(f"the warm worker did not start in {START_S:.0f} s (its log: {paths.log})")
            time.sleep(0.005)
        return s


def _idle_s() -> float:
    """LAYERSCOPE_WORKER_IDLE_S, else 600; Unavailable (a warning in the job log) for a bad value."""
    raw = os.environ.get(IDLE, "").strip()
    try:
        value = float(raw) if raw else IDLE_S
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise Unavailable(f"{IDLE}={raw!r} is not a number of seconds (0 or more; 0: a warm worker per "
                          f"snakemake run)", warn=True)
    return value


@contextlib.contextmanager
def _locked(path: Path, wait: bool = True) -> Iterator[int | None]:
    """Hold an flock on ``path`` (created if need be); None if ``wait`` is False and it is taken.
    A file the sweep removed while this waited for it is opened afresh."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            fd = None
            break
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def _held(path: Path) -> bool:
    """Whether some process holds an flock on ``path`` (a server on its pid file: it is alive)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _refusal(path: Path) -> str | None:
    """Why a server of this key refused to serve, while that still holds (its server's idle time
    for a shared one, its snakemake's run for one of a snakemake), or None."""
    try:
        r = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return r["why"] if r.get("until") is None or time.time() < r["until"] else None


def _sweep(d: Path) -> None:
    """Remove the files of keys none of whose servers is alive (holds the lock on its pid file),
    starting (its start lock is held) or has refused to serve lately. Files named ``PID-KEY`` of
    a snakemake still running are left to it (a server of one snakemake run)."""
    for stem in {f.name.split(".", 1)[0] for f in d.iterdir() if f.suffix in _FILES}:
        paths = _Paths(d, stem)
        with _locked(paths.lock, wait=False) as fd:
            if fd is None:
                continue
            alive = False
            for pidfile in d.glob(f"{stem}.*.pid"):
                if _held(pidfile):
                    alive = True
                else:
                    with contextlib.suppress(OSError):
                        pidfile.unlink()
            owner = stem.split("-", 1)[0]
            if alive or _refusal(paths.refused) is not None or (owner.isdigit() and "-" in stem
                                                                 and process_start(int(owner)) is not None):
                continue
            for f in (paths.sock, paths.log, paths.refused, paths.lock):
                with contextlib.suppress(OSError):
                    f.unlink()


def _stdio() -> list[int]:
    """This process's stdin, stdout and stderr to hand over (/dev/null for one that is closed)."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def _call(sock: socket.socket, request: dict, log_path: str) -> int:
    """Send the step, wait for its child's status; signals to this process go to the child."""
    got: list[int] = []

    def forward(signum, frame) -> None:
        got.append(signum)
        with contextlib.suppress(OSError):
            _send(sock, {"signal": signum})

    try:
        _send(sock, request, _stdio())
    except OSError as e:
        raise _Closed() from e
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        started = _recv(sock)
        if started is None:
            if got:  # stopped while the server was still starting: nothing ran, nothing to run
                return 128 + got[0]
            raise _Closed()
        setup_logging(log_path, mode="a")  # the child writes the log; this process only adds to it
        child = started["pid"]
        done = _recv(sock)
        if done is None:
            log.error("the warm worker (pid %d) died while running the step (pid %d): stopping it",
                      started["server"], child)
            _stop(child)
            return 1
        code = os.waitstatus_to_exitcode(done["status"])
        if code < 0:
            log.error("the step's process (pid %d) was killed by %s", child, signal.Signals(-code).name)
            return 128 - code
        return code
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _stop(pid: int, wait_s: float = 60.0) -> None:
    """SIGTERM an orphaned child (its server is gone) and wait for it to end."""
    start = process_start(pid)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while start is not None and process_start(pid) == start and time.monotonic() < deadline:
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Messages: a 4-byte length and JSON; the first one from a client carries its stdio


def _send(sock: socket.socket, msg: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(msg).encode()
    data = _HEADER.pack(len(data)) + data
    if fds:
        n = socket.send_fds(sock, [data], fds)  # the descriptors travel with the first byte
        data = data[n:]
    if data:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int, buf: bytearray) -> bool:
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except ConnectionResetError:  # the peer closed with data unread (a server exiting with jobs queued)
            return False
        if not chunk:
            return False
        buf += chunk
    return True


def _recv(sock: socket.socket, with_fds: bool = False) -> Any:
    """One message (``(message, fds)`` with ``with_fds``); None (``(None, fds)``) if the peer closed."""
    fds: list[int] = []
    buf = bytearray()
    if with_fds:
        data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 3)
        if not data:
            return None, fds
        buf += data
    ok = _recv_exact(sock, _HEADER.size, buf)
    if ok:
        n = _HEADER.unpack(bytes(buf[:_HEADER.size]))[0]
        if n > _MAX_MSG:
            raise ValueError(f"message of {n} bytes")
        ok = _recv_exact(sock, _HEADER.size + n, buf)
    msg = json.loads(bytes(buf[_HEADER.size:])) if ok else None
    return (msg, fds) if with_fds else msg


# ---------------------------------------------------------------------------------------------
# What `python -m layerscope worker status|stop` asks


def servers(d: Path | None = None, stem: str | None = None) -> list[dict]:
    """The live servers in this user's private directory (``d`` instead, if given; of one key's
    ``stem`` only, if given): what their pid files say (pid, start, key, log, owner, idle_s,
    started, idle_since, steps, running, state)."""
    d = d or runtime_dir()
    pattern = f"{glob.escape(stem)}.*.pid" if stem is not None else "*.pid"
    return [s for f in sorted(d.glob(pattern)) if _held(f) and (s := _read_state(f)) is not None]


def _read_state(f: Path) -> dict | None:
    for _ in range(50):  # a reader may catch the server rewriting it
        try:
            return json.loads(f.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            time.sleep(0.01)
    return None


def stop_servers(d: Path | None = None, wait_s: float = STOP_WAIT_S) -> tuple[int, int]:
    """Stop every live server (of ``d``): each stops taking jobs at once (SIGTERM) and exits once
    its running steps end. Waits up to ``wait_s`` for them; returns how many exited and how many
    are still finishing steps."""
    live = []
    for s in servers(d):
        if process_start(s["pid"]) == s["start"]:  # pid and start time: that server, not a reused pid
            with contextlib.suppress(OSError):
                os.kill(s["pid"], signal.SIGTERM)
                live.append(s)
    deadline = time.monotonic() + wait_s
    while (left := [s for s in live if process_start(s["pid"]) == s["start"]]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(live) - len(left), len(left)


# ---------------------------------------------------------------------------------------------
# The server


def serve(args: dict) -> None:
    """The server's main (started by a client, in its own session, stdout/stderr to its log)."""
    os.umask(0o077)
    setup_logging(None)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log.info("warm worker %d starting", os.getpid())
    server = _Server(_Paths(Path(args["dir"]), args["stem"]), args["owner"], args["owner_start"], args["idle_s"])
    try:
        server.start(args["preload"])
        server.loop()
    finally:
        server.close()


class _Server:
    def __init__(self, paths: _Paths, owner: int | None, owner_start: int | None, idle_s: float):
        self.paths, self.owner, self.owner_start, self.idle_s = paths, owner, owner_start, idle_s
        self.pid = os.getpid()
        self.sel = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.ino: int | None = None
        self.owner_fd: int | None = None
        self.pid_fd: int | None = None
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.children: dict[int, socket.socket | None] = {}  # child pid -> its client's connection
        self.conns: dict[socket.socket, int] = {}
        self.stopped = False  # `worker stop` (SIGTERM): no more jobs, exit once the running ones end
        self.state = {"pid": self.pid, "start": process_start(self.pid), "key": paths.stem, "log": str(paths.log),
                      "owner": owner, "idle_s": idle_s, "started": time.time(), "idle_since": time.time(),
                      "steps": 0, "running": 0, "state": "starting"}

    def start(self, preload: list[str]) -> None:
        # Its pid file, locked for its whole life (the sweep and `worker status` tell live servers
        # by that lock), before the socket: the client that started it holds the start lock until it
        # connects, so no sweep sees the pid file before it is locked.
        self.pid_fd = os.open(self.paths.pidfile(self.pid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.pid_fd, fcntl.LOCK_EX)
        self._write_state()
        signal.signal(signal.SIGTERM, self._on_stop)
        # Listen first (a client waits for the socket, and connections queue while imports run).
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.paths.sock))
        self.ino = os.stat(self.paths.sock).st_ino
        self.listener.listen(64)
        if self.owner is None:
            log.info("warm worker %d serving at %s until %g s without a step", self.pid, self.paths.sock,
                     self.idle_s)
        else:
            log.info("warm worker %d serving at %s for snakemake %d (until it exits, or %g s without a step)",
                     self.pid, self.paths.sock, self.owner, self.idle_s)
            if self.owner_start is None or process_start(self.owner) != self.owner_start:
                raise SystemExit("its snakemake is already gone")
            with contextlib.suppress(OSError, AttributeError):
                self.owner_fd = os.pidfd_open(self.owner)  # readable once snakemake exits
        # An import that asks torch whether CUDA is there must not start CUDA (forked children could
        # not use it): ask NVML instead. Children get the job's own environment back.
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        t = time.perf_counter()
        for name in preload:
            module, _, call = name.partition(":")  # "module:function": import it, then call it once
            try:
                importlib.import_module(module)
                if call:
                    getattr(sys.modules[module], call)()
            except Exception as e:  # a missing optional module: the child imports what it needs
                log.warning("preload %s: %s: %s", name, type(e).__name__, e)
        _spare_exit_work()
        log.info("preloaded %d modules in %.2f s", len(preload), time.perf_counter() - t)
        if (why := _fork_hazard()) is not None:
            # Kept while a server would have lived: the jobs meanwhile run in their own process
            # without each paying the imports again to hear the same answer.
            until = None if self.owner is not None else time.time() + self.idle_s
            self.paths.refused.write_text(json.dumps({"why": why, "until": until}) + "\n")
            log.error("refusing to serve: %s", why)
            raise SystemExit(1)
        signal.signal(signal.SIGCHLD, lambda s, f: None)  # a handler, so that the wakeup fd is written
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")  # stopped meanwhile: the loop closes it
        if self.owner_fd is not None:
            self.sel.register(self.owner_fd, selectors.EVENT_READ, "owner")
        self._write_state(state="serving")

    def _on_stop(self, signum, frame) -> None:
        if os.getpid() != self.pid:  # a child that has not reset its handlers yet: as a job takes it
            raise SystemExit(128 + signum)
        self.stopped = True
        self._unlink()  # no new client from now on; the loop closes the listener

    def loop(self) -> None:
        last, closing, gone = time.monotonic(), None, False
        while True:
            now = time.monotonic()
            if closing is None:
                gone = self.owner is not None and process_start(self.owner) != self.owner_start
                why = ("stopped (worker stop)" if self.stopped else f"snakemake {self.owner} is gone" if gone
                       else f"idle for {self.idle_s:g} s" if not self.children and now - last > self.idle_s
                       else None)
                if why is not None:
                    closing = now
                    log.info("%s: no more jobs; %d running", why, len(self.children))
                    self._unlisten()
                    self._write_state(state="stopping")
            # Stopped: the running steps finish; its snakemake gone: they are stopping themselves.
            if closing is not None and (not self.children or (gone and now - closing > GRACE_S)):
                return
            for key, _ in self.sel.select(timeout=1.0):
                last = time.monotonic()
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    with contextlib.suppress(OSError):
                        while os.read(self.wake_r, 512):
                            pass
                elif key.data == "owner":
                    self.sel.unregister(key.fileobj)  # the check above sees it
                else:
                    self._message(key.fileobj)
            self._reap()

    def _write_state(self, **change: Any) -> None:
        """Its pid file: what `worker status` shows, rewritten in place with one write."""
        self.state |= change
        self.state |= {"running": len(self.children), "idle_since": None if self.children else
                       (self.state["idle_since"] or time.time())}
        if self.pid_fd is not None:
            os.pwrite(self.pid_fd, json.dumps(self.state).encode().ljust(_STATE_BYTES), 0)

    def _unlink(self) -> None:
        with contextlib.suppress(OSError):
            if os.stat(self.paths.sock).st_ino == self.ino:  # not a newer server's
                self.paths.sock.unlink()

    def _unlisten(self) -> None:
        if self.listener is not None and os.getpid() == self.pid:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.listener)
            self.listener.close()
            self.listener = None
            self._unlink()

    def close(self) -> None:
        if os.getpid() != self.pid:
            return
        self._unlisten()
        if self.pid_fd is not None:
            with contextlib.suppress(OSError):
                self.paths.pidfile(self.pid).unlink()
        log.info("exiting")

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        fds: list[int] = []
        pidfd = None
        try:
            conn.settimeout(10.0)  # a client sends its request at once
            pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
            if uid != os.getuid():
                log.warning("refused a connection from uid %d", uid)
                conn.close()
                return
            req, fds = _recv(conn, with_fds=True)
            if req is None and not fds:  # a prestart: it only waited for the socket
                conn.close()
                return
            if req is None or req.get("protocol") != PROTOCOL or req.get("pid") != pid or len(fds) != 3:
                raise ValueError("not a request of this version")
            with contextlib.suppress(OSError, AttributeError):
                pidfd = os.pidfd_open(pid)  # the client is alive now: it waits for the answer
        except (OSError, ValueError) as e:
            log.warning("bad request: %s", e)
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        for h in logging.getLogger("layerscope").handlers:
            h.flush()
        try:
            child = os.fork()
        except OSError as e:  # no memory or processes left: the client runs the step itself
            log.error("cannot fork: %s", e)
            for fd in fds + ([pidfd] if pidfd is not None else []):
                os.close(fd)
            conn.close()
            return
        if child == 0:
            self._child(conn, req, fds, pid, pidfd)  # never returns
        for fd in fds + ([pidfd] if pidfd is not None else []):
            os.close(fd)
        log.info("job %d: %s.%s in pid %d", pid, *req["fn"], child)
        self.children[child] = conn
        self.conns[conn] = child
        self._write_state(steps=self.state["steps"] + 1)
        try:
            _send(conn, {"started": True, "pid": child, "server": os.getpid()})
            self.sel.register(conn, selectors.EVENT_READ, "conn")
        except OSError:  # the client is gone already; the child sees that itself
            self._drop(conn)

    def _message(self, conn: socket.socket) -> None:
        try:
            msg = _recv(conn)
        except (OSError, ValueError):
            msg = None
        if msg is None:  # the client closed or died; its child notices that on its own
            self._drop(conn)
            return
        child = self.conns.get(conn)
        sig = msg.get("signal")
        if child in self.children and sig in (signal.SIGTERM, signal.SIGINT):
            os.kill(child, sig)  # still our unreaped child: the pid cannot have been reused

    def _drop(self, conn: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn)
        child = self.conns.pop(conn, None)
        if child in self.children:
            self.children[child] = None
        conn.close()

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            log.info("pid %d ended: %s", pid, os.waitstatus_to_exitcode(status))
            self._write_state()
            if conn is not None:
                with contextlib.suppress(OSError):
                    _send(conn, {"status": status})
                self._drop(conn)

    def _child(self, conn: socket.socket, req: dict, fds: list[int], client: int, pidfd: int | None) -> None:
        """In the forked child: become the job's process, run the step, exit; never returns."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            # The server's descriptors are not the job's (and an open client connection would hide
            # the server's own death from the client).
            self.sel.close()
            for c in [*self.conns, conn]:
                c.close()
            if self.listener is not None:
                self.listener.close()
            # Its pid file too: a child holding that lock would keep a dead server "alive".
            for fd in (self.wake_r, self.wake_w, self.owner_fd, self.pid_fd):
                if fd is not None:
                    os.close(fd)
            for h in logging.getLogger("layerscope").handlers:
                h.close()
            for i, fd in enumerate(fds):
                os.dup2(fd, i)
                if fd > 2:
                    os.close(fd)
            _rebind_stdio()
            os.environ.clear()
            os.environ.update(req["env"])
            tempfile.tempdir = None  # gettempdir() caches; the job's TMPDIR wins
            os.chdir(req["cwd"])
            os.umask(req["umask"])  # the server's own is 077
            sys.argv = req["argv"]
            # The job's import path: the server's is only what its own imports needed (see _code),
            # and a long-lived server's cached directory listings may be out of date.
            sys.path[:] = req["path"]
            importlib.invalidate_caches()
            _fresh_process_state()
            fn, runner = _resolve(req["fn"]), _resolve(req["runner"])
            exit_with_process(client, f"the job's process (pid {client})", pidfd)
            runner(req["log"], fn, _from_json(req["kwargs"]),
                   f"running in the warm worker: server pid {os.getppid()}, step pid {os.getpid()}, "
                   f"job pid {client}")
            code = 0
        except SystemExit as e:
            code = _exit_code(e.code)
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 128 + signal.SIGINT
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            exit_like_python(code)


def _spare_exit_work() -> None:
    """Leave out of every forked step's exit the work the imports registered for their own objects:
    the finalizers existing now belong to the server's objects (torch's operator libraries: 25 ms of
    tearing down a registry the step's process is about to drop), and torch's compile-time report
    imports tabulate to log a table of compiles no step makes (20 ms). Together a third to a half of
    a light step's time in the worker. The step's own finalizers and exit handlers still run."""
    for obj in gc.get_objects():
        if isinstance(obj, weakref.finalize):
            obj.atexit = False
    dynamo = sys.modules.get("torch._dynamo.utils")
    if dynamo is not None and callable(report := getattr(dynamo, "dump_compile_times", None)):
        atexit.unregister(report)


def _fork_hazard() -> str | None:
    """Why forking this process would give children that cannot work, or None.

    Threads of this interpreter would be lost in a child (with any lock they hold); CUDA started
    here cannot be used in a child. A probe child checks what torch itself says about that.
    """
    if threading.active_count() > 1:
        return f"the imports started {threading.active_count() - 1} Python thread(s)"
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if torch.cuda.is_initialized():
        return "the imports initialised CUDA"
    pid = os.fork()
    if pid == 0:
        bad = 0
        with contextlib.suppress(BaseException):
            bad = 3 if torch.cuda._is_in_bad_fork() else 0
        os._exit(bad)
    _, status = os.waitpid(pid, 0)
    return None if os.waitstatus_to_exitcode(status) == 0 else "torch says a forked child could not use CUDA"


def _rebind_stdio() -> None:
    """New sys.stdin/stdout/stderr on the job's descriptors, buffered as Python would buffer them."""
    enc, errors = sys.stdout.encoding if sys.stdout else "utf-8", sys.stdout.errors if sys.stdout else "strict"
    sys.stdin = open(0, "r", encoding=enc, closefd=False)
    sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, encoding=enc, errors=errors, closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding=enc, errors="backslashreplace", closefd=False)


def _fresh_process_state() -> None:
    """What a new process would have and a forked one does not: the job's thread counts (Snakemake
    sets them per job; the libraries read them when the server imported them) and fresh random
    seeds for numpy and torch (a new process seeds both from the OS; forked children would all
    draw the server's numbers)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:
            torch.set_num_threads(int(threads))
        torch.default_generator.seed()
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()


def _resolve(ref: list[str]) -> Callable:
    target: Any = importlib.import_module(ref[0])
    for part in ref[1].split("."):
        target = getattr(target, part)
    return target


def _exit_code(code: Any) -> int:
    """The status Python gives ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def exit_like_python(code: int) -> None:
    """Finish as an interpreter does (join threads, atexit, flush) and leave out its teardown: a
    forked step must not unwind into the server's frames, which belong to the server; and for the
    job's own process, which only waited for its step, unloading its modules (20 ms of a light
    job's 0.2 s) does nothing."""
    with contextlib.suppress(BaseException):
        threading._shutdown()  # joins non-daemon threads, stops executors, as at interpreter exit
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            f.flush()
    os._exit(code)
