"""The warm worker (worker.py): model steps forked from a server that has imported torch.

Jobs here are started as Snakemake starts a script job: a process whose parent runs "snakemake"
(a stand-in, so that the tests can kill it) runs a script in ``.snakemake/scripts/`` that calls
``steps.run_step``. Every stand-in has a private directory of its own for its servers (or shares
one with another stand-in, as two snakemake runs of one user do); the servers there are stopped as
``worker stop`` stops them, and the test checks that they went.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

from layerscope import steps, worker
from layerscope.watchdog import process_start
from tests.conftest import REPO, copy_inputs, run_snakemake

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the warm worker needs Linux")

WAIT_S = 300  # generous: a server's first imports take seconds on a busy machine

# Starts each job it reads from stdin (one JSON line each) as a child, as snakemake does; writes
# the child's pid and, once it has ended, its exit status to files named by the job.
FAKE_SNAKEMAKE = r"""
import json, subprocess, sys, threading
from pathlib import Path

d = Path(sys.argv[1])

def run(job):
    stdin = open(job["stdin"], "rb") if job.get("stdin") else subprocess.DEVNULL
    with open(d / f"{job['id']}.out", "wb") as out, open(d / f"{job['id']}.err", "wb") as err:
        p = subprocess.Popen(job["argv"], env=job["env"], cwd=job["cwd"], stdin=stdin, stdout=out, stderr=err)
        (d / f"{job['id']}.pid").write_text(str(p.pid))
        rc = p.wait()
    (d / f"{job['id']}.rc.tmp").write_text(str(rc))
    (d / f"{job['id']}.rc.tmp").rename(d / f"{job['id']}.rc")

for line in sys.stdin:
    threading.Thread(target=run, args=(json.loads(line),)).start()
"""

# A workflow script: run one step of tests/worker_steps.py through run_step.
JOB = r"""
import json, os, sys, time
from layerscope import steps
from tests import worker_steps

args = json.loads(sys.argv[1])
os.umask(args.get("umask", 0o022))
while args.get("go") and not os.path.exists(args["go"]):  # jobs that should start at the same moment
    time.sleep(0.001)
steps.WARM_IMPORTS.extend(args.get("preload", []))
sys.path.extend(args.get("extra_path", []))  # as Snakemake's preamble appends its search path
kwargs = args["kwargs"]
for k in args.get("tuples", []):
    kwargs[k] = tuple(kwargs[k])
for k in args.get("sets", []):
    kwargs[k] = set(kwargs[k])
steps.run_step(args["log"], getattr(worker_steps, args["step"]), **kwargs)
"""


def wait_for(cond, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := cond():
            return v
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


class Job:
    def __init__(self, fake: FakeSnakemake, name: str, log: Path):
        self.fake, self.name, self.log = fake, name, log

    def _file(self, ext: str) -> Path:
        return self.fake.dir / f"{self.name}.{ext}"

    @property
    def pid(self) -> int:
        return int(wait_for(lambda: self._file("pid").is_file() and self._file("pid").read_text(), "the job's pid"))

    def wait(self) -> int:
        return int(wait_for(lambda: self._file("rc").is_file() and self._file("rc").read_text(), f"job {self.name}"))

    @property
    def stdout(self) -> str:
        return self._file("out").read_text()

    @property
    def stderr(self) -> str:
        return self._file("err").read_text()


class FakeSnakemake:
    """A process named snakemake that starts jobs; its own short runtime dir (or ``runtime``, which
    another stand-in made) keeps its servers apart."""

    def __init__(self, tmp: Path, runtime: Path | None = None):
        self.dir = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "snakemake").write_text(FAKE_SNAKEMAKE)
        self.script = tmp / ".snakemake" / "scripts" / "job.py"  # where Snakemake puts a script job's script
        self.script.parent.mkdir(parents=True)
        self.script.write_text(JOB)
        self.own_runtime = runtime is None
        self.runtime = runtime or Path(tempfile.mkdtemp(prefix="lsw"))  # short: unix socket paths are limited
        self.proc = subprocess.Popen([sys.executable, str(tmp / "snakemake"), str(tmp)], stdin=subprocess.PIPE,
                                     text=True)
        self.count = 0

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != worker.SWITCH}
        # Keep an inherited PYTHONPATH last: some machines bring packages (zarr, snakemake) through it.
        path = [str(REPO / "src"), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        env |= {"PYTHONPATH": os.pathsep.join(path), "XDG_RUNTIME_DIR": str(self.runtime),
                "OMP_NUM_THREADS": "1"}
        return env | extra

    def submit(self, step: str, cwd: Path | None = None, env: dict | None = None, stdin: str | None = None,
               **args) -> Job:
        self.count += 1
        name = f"job{self.count}"
        log = self.dir / f"{name}.log"
        job = {"id": name, "argv": [sys.executable, str(self.script),
                                    json.dumps({"step": step, "log": str(log), **args})],
               "env": env or self.env(), "cwd": str(cwd or self.dir)}
        if stdin is not None:
            (self.dir / f"{name}.in").write_text(stdin)
            job["stdin"] = str(self.dir / f"{name}.in")
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return Job(self, name, log)

    def servers(self) -> list[int]:
        """Pids of the servers started in its runtime dir (from their logs)."""
        return [int(m.group(1)) for f in (self.runtime / "layerscope").glob("*.log")
                for m in re.finditer(r"layerscope.worker: warm worker (\d+) starting", f.read_text())]

    def kill(self) -> None:
        """Kill it as a user would kill snakemake; stop the servers of its runtime dir as `worker
        stop` does, and check they went."""
        self.proc.kill()
        self.proc.wait()
        if self.own_runtime:
            stop(self)
            shutil.rmtree(self.runtime, ignore_errors=True)


def stop(fake: FakeSnakemake) -> None:
    """``worker stop`` for the servers of ``fake``'s runtime dir; they are gone when it returns."""
    if (fake.runtime / "layerscope").is_dir():
        assert worker.stop_servers(fake.runtime / "layerscope")[1] == 0
    for pid in fake.servers():
        wait_for(lambda: process_start(pid) is None, f"server {pid} to exit", timeout=120)


def server_of(job: Job) -> int:
    """The server a job's step ran in, from the first line of its log."""
    m = re.search(r"running in the warm worker: server pid (\d+),", job.log.read_text().splitlines()[0])
    assert m, job.log.read_text()
    return int(m.group(1))


@pytest.fixture
def fake(tmp_path):
    f = FakeSnakemake(tmp_path / "sm")
    yield f
    f.kill()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One stand-in (and so one server) for the tests that need nothing of their own."""
    f = FakeSnakemake(tmp_path_factory.mktemp("shared") / "sm")
    yield f
    f.kill()


def report(fake: FakeSnakemake, **env: str) -> tuple[Job, dict]:
    out = fake.dir / f"report{fake.count + 1}.json"
    job = fake.submit("report", kwargs={"out": str(out)}, env=fake.env(**env))
    assert job.wait() == 0, job.stderr
    return job, json.loads(out.read_text())


def test_a_step_in_the_worker_sees_what_it_would_see_in_its_own_process(shared, tmp_path):
    cwd = tmp_path / "work dir"
    cwd.mkdir()
    own_tmp = tmp_path / "tmp"
    own_tmp.mkdir()
    kwargs = {"out": "", "pair": [1, "two"], "nested": {"a": [None, True, 1.5], "t": [["x", 2]]}}
    results = {}
    for mode, extra in (("worker", {}), ("in-process", {worker.SWITCH: "0"})):
        out = tmp_path / f"{mode}.json"
        env = shared.env(LS_TEST_VALUE=f"value for {mode} ✓", TMPDIR=str(own_tmp), CUDA_VISIBLE_DEVICES="3", **extra)
        job = shared.submit("report", cwd=cwd, env=env, stdin=f"input for {mode}", umask=0o027,
                            kwargs=kwargs | {"out": str(out)}, tuples=["pair"])
        assert job.wait() == 0, job.stderr
        seen = json.loads(out.read_text())
        results[mode] = seen
        assert seen["cwd"] == str(cwd)
        assert seen["env"]["LS_TEST_VALUE"] == f"value for {mode} ✓"
        assert seen["env"] == env
        assert seen["tmpdir"] == str(own_tmp) and seen["umask"] == 0o027
        assert seen["stdin"] == f"input for {mode}"
        assert "step stdout" in job.stdout and "step stderr" in job.stderr
        assert seen["argv"][0] == str(shared.script) and json.loads(seen["argv"][1])["log"] == str(job.log)
        assert seen["path"][0] == str(shared.script.parent)
        log = job.log.read_text()
        if mode == "worker":
            assert seen["pid"] != job.pid and seen["ppid"] in shared.servers()
            assert f"running in the warm worker: server pid {seen['ppid']}, step pid {seen['pid']}, " \
                   f"job pid {job.pid}" in log
        else:
            assert seen["pid"] == job.pid
            assert "running in the job's own process, not in the warm worker: LAYERSCOPE_WORKER=0" in log
    a, b = results["worker"], results["in-process"]
    assert a["kwargs"] == b["kwargs"] and "'pair': (1, 'two')" in a["kwargs"]  # tuples stay tuples
    assert a["path"] == b["path"]  # the job's import path, not the server's


@pytest.mark.parametrize("switch", ["1", "0"])
def test_errors_and_exit_codes_are_those_of_a_step_in_its_own_process(shared, switch):
    env = shared.env(**{worker.SWITCH: switch})
    job = shared.submit("fail", env=env, kwargs={"message": "data.jsonl:3: 'text' is empty"})
    assert job.wait() == 1
    for text in (job.stderr, job.log.read_text()):
        assert "ERROR layerscope.steps: data.jsonl:3: 'text' is empty" in text
        assert "Traceback" not in text
    job = shared.submit("crash", env=env, kwargs={})
    assert job.wait() == 1
    assert "IndexError: list index out of range" in job.log.read_text()
    job = shared.submit("exit_with", env=env, kwargs={"code": 3})
    assert job.wait() == 3
    assert ("running in the warm worker" in job.log.read_text()) == (switch == "1")


def test_concurrent_jobs_of_two_snakemakes_start_one_server(fake, tmp_path):
    other = FakeSnakemake(tmp_path / "sm2", runtime=fake.runtime)  # another snakemake run of the same user
    try:
        go = fake.dir / "go"
        jobs = [f.submit("report", kwargs={"out": str(fake.dir / f"c{i}.json")}, go=str(go))
                for i, f in enumerate([fake, other] * 2)]
        for j in jobs:
            j.pid  # all four processes are up and waiting
        time.sleep(1.0)  # for their imports (a longer or shorter wait only changes how close they start)
        go.touch()
        assert [j.wait() for j in jobs] == [0] * 4, [j.stderr for j in jobs]
    finally:
        other.kill()
    servers = {json.loads((fake.dir / f"c{i}.json").read_text())["ppid"] for i in range(4)}
    assert len(servers) == 1 and servers == set(fake.servers())
    assert len(list((fake.runtime / "layerscope").glob("*.sock"))) == 1
    # and no job started a server of its own that then found the socket taken
    assert next((fake.runtime / "layerscope").glob("*.log")).read_text().count(" starting") == 1


@pytest.mark.parametrize("env", [{worker.IDLE: "0"}, {"SLURM_JOB_ID": "4242"}], ids=["idle0", "slurm"])
def test_a_server_of_one_snakemake_exits_when_its_snakemake_dies(fake, env):
    """LAYERSCOPE_WORKER_IDLE_S=0, or a job under SLURM: a server per snakemake, as before."""
    job, seen = report(fake, **env)
    server = seen["ppid"]
    sock = next((fake.runtime / "layerscope").glob("*.sock"))
    assert sock.name.startswith(f"{fake.proc.pid}-")
    assert process_start(server) is not None
    fake.proc.kill()  # snakemake killed (SIGKILL): it cannot stop anything itself
    fake.proc.wait()
    wait_for(lambda: process_start(server) is None, "the server to exit", timeout=120)
    assert not sock.exists()
    log = next((fake.runtime / "layerscope").glob("*.log")).read_text()
    assert f"for snakemake {fake.proc.pid} (until it exits, or 60 s without a step)" in log
    assert "is gone: no more jobs" in log


def test_a_second_snakemake_is_served_by_the_server_the_first_started(fake, tmp_path):
    """The server outlives the snakemake that started it; another snakemake (another project
    directory, another Snakemake source cache at the end of sys.path) connects to it."""
    out = fake.dir / "first.json"
    job = fake.submit("report", kwargs={"out": str(out)},
                      extra_path=[sysconfig.get_paths()["purelib"], str(fake.dir), sysconfig.get_paths()["purelib"],
                                  str(fake.dir / "tmpxyz789")])
    assert job.wait() == 0, job.stderr
    server = server_of(job)
    fake.proc.kill()
    fake.proc.wait()
    time.sleep(2.5)  # more than the 1 s a server of that snakemake would take to notice it went
    assert process_start(server) is not None
    later = FakeSnakemake(tmp_path / "elsewhere" / "sm", runtime=fake.runtime)
    try:
        # Snakemake appends its own site-packages, its own sys.path (the directory it was started in
        # first) and a source cache of its run: none of them makes another server
        site = sysconfig.get_paths()["purelib"]
        appended = [site, str(later.dir), site, str(tmp_path / "source-cache" / "tmpabc123")]
        out = tmp_path / "later.json"
        job = later.submit("report", kwargs={"out": str(out)}, extra_path=appended)
        assert job.wait() == 0, job.stderr
    finally:
        later.kill()
    assert server_of(job) == server and json.loads(out.read_text())["ppid"] == server
    assert json.loads(out.read_text())["path"][-4:] == appended  # the step saw the job's own sys.path
    assert fake.servers() == [server]


def test_an_edited_layerscope_file_gives_a_new_server(fake, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(REPO / "src" / "layerscope", pkg / "layerscope", ignore=shutil.ignore_patterns("__pycache__"))
    env = fake.env()
    env["PYTHONPATH"] = os.pathsep.join([str(pkg), env["PYTHONPATH"]])
    servers = []
    for edit in (False, False, True, False):
        if edit:
            f = pkg / "layerscope" / "store" / "layout.py"
            os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))
        out = tmp_path / f"s{len(servers)}.json"
        job = fake.submit("report", env=env, kwargs={"out": str(out)})
        assert job.wait() == 0, job.stderr
        assert json.loads(out.read_text())["path"][1] == str(pkg)
        servers.append(server_of(job))
    assert servers[0] == servers[1] != servers[2] == servers[3]
    assert len(list((fake.runtime / "layerscope").glob("*.sock"))) == 2  # the old one idles out


def test_a_shared_server_exits_after_idle_s_without_a_step(fake):
    job, seen = report(fake, **{worker.IDLE: "2"})
    server = server_of(job)
    t = time.monotonic()
    wait_for(lambda: process_start(server) is None, "the server to idle out", timeout=60)
    assert time.monotonic() - t > 1.0
    assert fake.proc.poll() is None  # its snakemake still runs: the idle time ended it
    log = next((fake.runtime / "layerscope").glob("*.log")).read_text()
    assert "idle for 2 s: no more jobs" in log and not list((fake.runtime / "layerscope").glob("*.sock"))


def _cli(fake: FakeSnakemake, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerscope", "worker", *args], env=fake.env(),
                          capture_output=True, text=True, timeout=WAIT_S)


def test_worker_status_lists_servers_and_worker_stop_stops_them_once_their_steps_end(fake, tmp_path):
    part = tmp_path / "part.tmp"
    holding = fake.submit("hold", kwargs={"tmp": str(part)})
    step = int(wait_for(lambda: part.is_file() and part.read_text(), "the step to start"))
    server = server_of(holding)
    res = _cli(fake, "status")
    assert res.returncode == 0, res.stderr
    (line,) = res.stdout.splitlines()
    log = next((fake.runtime / "layerscope").glob("*.log"))
    assert line.startswith(f"pid {server}  key ") and "running 1 step" in line and "steps run 1" in line
    assert line.endswith(f"log {log}")
    stopper = subprocess.Popen([sys.executable, "-m", "layerscope", "worker", "stop"], env=fake.env(),
                               stdout=subprocess.PIPE, text=True)
    # It stops taking jobs at once: the next job starts a server of its own...
    wait_for(lambda: not list((fake.runtime / "layerscope").glob("*.sock")), "the server to stop listening")
    job, seen = report(fake)
    assert server_of(job) != server
    # ...and it exits when its running step ends.
    assert process_start(server) is not None and process_start(step) is not None
    os.kill(holding.pid, signal.SIGTERM)
    assert holding.wait() == 128 + signal.SIGTERM
    assert stopper.wait(timeout=WAIT_S) == 0
    assert stopper.stdout.read() == "stopped 1 warm worker\n"
    assert process_start(server) is None and not part.exists()
    res = _cli(fake, "status")
    assert res.stdout.startswith(f"pid {server_of(job)}  key ") and "idle for" in res.stdout
    res = _cli(fake, "stop")
    assert (res.returncode, res.stdout) == (0, "stopped 1 warm worker\n")
    assert _cli(fake, "status").stdout == "no warm worker running\n"


def test_a_join_only_step_runs_in_a_running_server_but_never_starts_one(fake, tmp_path):
    out = tmp_path / "alone.json"
    job = fake.submit("join", kwargs={"out": str(out)})
    assert job.wait() == 0, job.stderr
    assert json.loads(out.read_text())["pid"] == job.pid and fake.servers() == []
    assert "not in the warm worker: no warm worker is ready, and this step does not start one" \
        in job.log.read_text()
    first, seen = report(fake)
    job = fake.submit("join", kwargs={"out": str(out)})
    assert job.wait() == 0, job.stderr
    assert server_of(job) == server_of(first) == json.loads(out.read_text())["ppid"]


def test_a_join_only_step_does_not_wait_for_a_server_still_importing(fake, tmp_path):
    mods, go = tmp_path / "mods", tmp_path / "go"
    mods.mkdir()
    (mods / "ls_slow_import.py").write_text(f"import os, time\nwhile not os.path.exists({str(go)!r}):\n"
                                            "    time.sleep(0.05)\n")
    env = fake.env()
    env["PYTHONPATH"] += os.pathsep + str(mods)
    starter = fake.submit("report", env=env, kwargs={"out": str(tmp_path / "s.json")}, preload=["ls_slow_import"])
    wait_for(fake.servers, "the server to start")  # listening, still importing
    out = tmp_path / "j.json"
    job = fake.submit("join", env=env, kwargs={"out": str(out)}, preload=["ls_slow_import"])
    assert job.wait() == 0, job.stderr
    assert json.loads(out.read_text())["pid"] == job.pid
    assert "no warm worker is ready, and this step does not start one" in job.log.read_text()
    go.touch()
    assert starter.wait() == 0, starter.stderr
    assert server_of(starter) == fake.servers()[0]


def test_a_prestarting_step_starts_a_server_for_the_model_steps_after_it(fake, tmp_path):
    out = tmp_path / "p.json"
    job = fake.submit("prepare", kwargs={"out": str(out)})
    assert job.wait() == 0, job.stderr
    assert json.loads(out.read_text())["pid"] == job.pid  # the step itself ran in its own process
    assert len(fake.servers()) == 1
    first, _ = report(fake)
    assert server_of(first) == fake.servers()[0]
    again = fake.submit("prepare", kwargs={"out": str(out)})  # a server is up: nothing more starts
    assert again.wait() == 0, again.stderr
    assert len(fake.servers()) == 1 and server_of(report(fake)[0]) == server_of(first)
    logs = "".join(f.read_text() for f in (fake.runtime / "layerscope").glob("*.log"))
    assert "bad request" not in logs and "WARNING" not in logs
    env = fake.env(**{worker.SWITCH: "0"})  # nor where the worker is off
    assert fake.submit("prepare", env=env, kwargs={"out": str(out)}).wait() == 0
    assert len(fake.servers()) == 1


def test_a_preload_function_runs_once_in_the_server_before_any_fork(fake, tmp_path):
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "ls_counts.py").write_text("import os\nCALLS = []\ndef warm():\n    CALLS.append(os.getpid())\n")
    env = fake.env()
    env["PYTHONPATH"] += os.pathsep + str(mods)
    seen = []
    for i in range(2):
        out = tmp_path / f"c{i}.json"
        job = fake.submit("preloaded", env=env, kwargs={"out": str(out), "module": "ls_counts"},
                          preload=["ls_counts:warm"])
        assert job.wait() == 0, job.stderr
        seen.append(json.loads(out.read_text()))
    server = fake.servers()[0]
    assert [r["calls"] for r in seen] == [[server], [server]]  # called in the server, once for both
    assert all(r["ppid"] == server and r["pid"] != server for r in seen)
    assert "layerscope.models.loading:preload" in steps.WARM_IMPORTS  # the capture's tokenizer tables


def test_a_forked_step_runs_its_own_exit_handlers_and_finalizers_not_those_of_the_servers_imports(fake, tmp_path):
    mods = tmp_path / "mods"
    mods.mkdir()
    # A module with an object finalized at interpreter exit, as torch's operator libraries are.
    (mods / "ls_exit.py").write_text(
        "import os, weakref\n"
        "class Lib:\n    pass\n"
        "LIB = Lib()\n"
        "def _note(path):\n"
        "    with open(path, 'a') as f:\n"
        "        f.write(f'import finalizer {os.getpid()}\\n')\n"
        "weakref.finalize(LIB, _note, os.environ['LS_EXIT_NOTES'])\n")
    seen = {}
    for mode, switch in (("worker", "1"), ("in-process", "0")):
        notes = tmp_path / f"{mode}.txt"
        env = fake.env(**{worker.SWITCH: switch, "LS_EXIT_NOTES": str(notes)})
        env["PYTHONPATH"] += os.pathsep + str(mods)
        job = fake.submit("exits", env=env, kwargs={"out": str(notes), "module": "ls_exit"}, preload=["ls_exit"])
        assert job.wait() == 0, job.stderr
        seen[mode] = sorted(notes.read_text().splitlines())
    # In the warm worker the server imported the module: its object and finalizer are the server's,
    # and the step's process ends without running it; the step's own handler and finalizer run.
    pid = int(seen["worker"][0].split()[-1])
    assert pid not in fake.servers()
    assert seen["worker"] == [f"step atexit {pid}", f"step finalizer {pid}"]
    # In a process of its own the job imported the module itself, and all three run at its exit.
    pid = int(seen["in-process"][0].split()[-1])
    assert seen["in-process"] == [f"import finalizer {pid}", f"step atexit {pid}", f"step finalizer {pid}"]


def test_torchs_exit_report_is_left_out_of_a_forked_steps_exit():
    # dynamo's compile-time report imports tabulate at every exit to log a table of no compiles.
    code = ("import atexit, sys, torch._dynamo.utils\n"
            "from layerscope import worker\n"
            "if sys.argv[1] == 'spare':\n    worker._spare_exit_work()\n"
            "atexit._run_exitfuncs()\n"
            "print('tabulate' in sys.modules)\n")
    out = {how: subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, check=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                   [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
                               ).stdout.split()[-1]
           for how in ("spare", "keep")}
    assert out == {"spare": "False", "keep": "True"}


def test_a_bad_idle_time_is_a_warning_and_the_step_runs_in_its_own_process(fake, tmp_path):
    out = tmp_path / "r.json"
    job = fake.submit("report", env=fake.env(**{worker.IDLE: "abc"}), kwargs={"out": str(out)})
    assert job.wait() == 0, job.stderr
    assert json.loads(out.read_text())["pid"] == job.pid and fake.servers() == []
    assert ("WARNING layerscope.steps: running in the job's own process, not in the warm worker: "
            "LAYERSCOPE_WORKER_IDLE_S='abc' is not a number of seconds") in job.log.read_text()


def test_the_sweep_removes_the_files_of_dead_servers_only(tmp_path):
    d = tmp_path / "rt"
    d.mkdir()
    for stem in ("dead", "alive", "starting", f"{os.getpid()}-run", "refused"):
        for suffix in (".sock", ".log", ".lock"):
            (d / f"{stem}{suffix}").touch()
        (d / f"{stem}.99.pid").touch()
    (d / "refused.refused").write_text(json.dumps({"why": "threads", "until": time.time() + 600}))
    with open(d / "alive.99.pid") as alive, open(d / "starting.lock") as starting:
        fcntl.flock(alive, fcntl.LOCK_EX)  # as a live server holds its pid file
        fcntl.flock(starting, fcntl.LOCK_EX)  # as a client starting a server holds the start lock
        worker._sweep(d)
    left = sorted(f.name for f in d.iterdir())
    assert not [f for f in left if f.startswith("dead")]
    for stem in ("alive", "starting", f"{os.getpid()}-run", "refused"):
        assert {f"{stem}.sock", f"{stem}.log"} <= set(left), left
    assert "alive.99.pid" in left and "starting.99.pid" in left and "refused.99.pid" not in left


def test_a_killed_job_process_stops_its_step_which_cleans_up(shared, tmp_path):
    for sig, rc in ((signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, 128 + signal.SIGTERM),
                    (signal.SIGINT, 128 + signal.SIGINT)):
        part = tmp_path / f"part-{sig.name}.tmp"
        job = shared.submit("hold", kwargs={"tmp": str(part)})
        step = int(wait_for(lambda: part.is_file() and part.read_text(), "the step to start"))
        assert step != job.pid
        os.kill(job.pid, sig)  # SIGKILL: Snakemake's own kill, or an OOM kill, of the job
        assert job.wait() == rc
        wait_for(lambda: not part.exists() and process_start(step) is None, "the step to stop and clean up")
        if sig == signal.SIGKILL:
            assert f"the job's process (pid {job.pid}) is gone: stopping" in job.log.read_text()


def test_a_killed_step_is_a_failed_job(shared, tmp_path):
    part = tmp_path / "part.tmp"
    job = shared.submit("hold", kwargs={"tmp": str(part)})
    step = int(wait_for(lambda: part.is_file() and part.read_text(), "the step to start"))
    os.kill(step, signal.SIGKILL)  # as tests/test_resume.py kills the pid in a capture's journal
    assert job.wait() == 128 + signal.SIGKILL
    assert f"the step's process (pid {step}) was killed by SIGKILL" in job.log.read_text()


def test_a_step_in_the_worker_stops_and_cleans_up_when_snakemake_dies(fake, tmp_path):
    part = tmp_path / "part.tmp"
    job = fake.submit("hold", kwargs={"tmp": str(part)})
    step = int(wait_for(lambda: part.is_file() and part.read_text(), "the step to start"))
    assert step != job.pid
    fake.proc.kill()
    wait_for(lambda: not part.exists() and process_start(step) is None, "the step to stop and clean up")
    assert "the snakemake process that started this job is gone: stopping" in job.log.read_text()


def test_torch_in_a_forked_child(shared, tmp_path):
    facts = {}
    for threads in ("1", "2"):  # the server was started by a job with OMP_NUM_THREADS=1
        out = tmp_path / f"t{threads}.json"
        job = shared.submit("torch_facts", env=shared.env(OMP_NUM_THREADS=threads),
                            kwargs={"out": str(out), "threads": 2})
        assert job.wait() == 0, job.stderr
        assert "running in the warm worker" in job.log.read_text()
        facts[threads] = json.loads(out.read_text())
    for threads, f in facts.items():
        assert f["default_threads"] == int(threads)  # as Snakemake's OMP_NUM_THREADS gives a new process
        assert f["threads"] == 2 and f["sum"] == f["sum"]
        assert not f["bad_fork"] and not f["cuda_initialized"]
    assert facts["1"]["rand"] != facts["2"]["rand"]  # seeded afresh, as new processes are, not the server's draws


def test_jobs_in_the_worker_claim_gpus_of_their_own(shared, tmp_path):
    """Each job narrows CUDA_VISIBLE_DEVICES in its own (forked) process, as capture/gpus.py does."""
    release = tmp_path / "release"
    env = shared.env(CUDA_VISIBLE_DEVICES="0,1", LAYERSCOPE_GPU_LOCKS=str(tmp_path / "locks"))
    outs = [tmp_path / f"gpu{i}.json" for i in range(2)]
    jobs = [shared.submit("claim_gpu", env=env, kwargs={"out": str(o), "release": str(release)}) for o in outs]
    claimed = [json.loads(wait_for(lambda o=o: o.is_file() and o.read_text(), "a claim")) for o in outs]
    release.touch()
    assert [j.wait() for j in jobs] == [0, 0]
    assert all("running in the warm worker" in j.log.read_text() for j in jobs)
    assert sorted(c["visible"] for c in claimed) == ["0", "1"] and {c["device"] for c in claimed} == {"cuda"}


def test_where_the_worker_cannot_be_used_the_step_runs_in_its_own_process(shared, tmp_path):
    out = tmp_path / "set.json"
    job = shared.submit("report", kwargs={"out": str(out), "names": ["a"]}, sets=["names"])
    assert job.wait() == 0, job.stderr
    assert json.loads(out.read_text())["pid"] == job.pid
    assert "not in the warm worker: kwargs['names'] is a set, not JSON" in job.log.read_text()
    # not started by snakemake: run by this test directly
    out = tmp_path / "direct.json"
    res = subprocess.run([sys.executable, str(shared.script), json.dumps(
        {"step": "report", "log": str(tmp_path / "direct.log"), "kwargs": {"out": str(out)}})],
        env=shared.env(), capture_output=True, text=True, timeout=WAIT_S)
    assert res.returncode == 0, res.stderr
    assert "not in the warm worker: this job was not started by snakemake" in (tmp_path / "direct.log").read_text()


def test_a_server_whose_imports_make_forking_unsafe_refuses_and_jobs_run_in_their_own_process(fake, tmp_path):
    threads = tmp_path / "mods"
    threads.mkdir()
    (threads / "ls_starts_a_thread.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n")
    env = fake.env()
    env["PYTHONPATH"] += os.pathsep + str(threads)
    for i in range(2):
        out = tmp_path / f"r{i}.json"
        job = fake.submit("report", env=env, kwargs={"out": str(out)}, preload=["ls_starts_a_thread"])
        assert job.wait() == 0, job.stderr
        assert json.loads(out.read_text())["pid"] == job.pid
        assert "not in the warm worker: the warm worker refused to serve: the imports started 1 Python thread(s)" \
            in job.log.read_text()
    assert len(fake.servers()) == 1  # the second job did not try again


def test_which_steps_are_warm():
    assert worker.wanted(steps.capture, {}) and worker.wanted(steps.steering_generate, {})
    assert worker.wanted(steps.answer_pass, {})
    assert worker.wanted(steps.fetch_model, {"model": {"id": "builtin:llama-tiny"}})
    assert not worker.wanted(steps.fetch_model, {"model": {"id": "/data/models/llama"}})
    assert worker.wanted(steps.fetch_adapter, {"adapter": None, "adapters": {"c": {"id": "builtin:lora"}}})
    assert not worker.wanted(steps.fetch_adapter, {"adapter": {"id": "org/lora"}, "adapters": None})
    for model_step in (steps.capture, steps.steering_generate, steps.answer_pass, steps.fetch_model,
                       steps.fetch_adapter):
        assert worker.starts(model_step)
    # what runs before the model steps, in its own process, starts a server for them meanwhile
    assert worker.prestarts(steps.fetch_model) and worker.prestarts(steps.prepare_dataset)
    assert not worker.prestarts(steps.store) and not worker.prestarts(steps.capture)
    # steps that need no torch: in a server that runs already, never starting one
    for torch_free in (steps.prepare_dataset, steps.prepare_pass, steps.store, steps.metadata, steps.summarize,
                       steps.dashboard, steps.pass_metadata, steps.steering_vector, steps.steering_summary,
                       steps.steering_page):
        assert worker.wanted(torch_free, {}) and not worker.starts(torch_free)
    assert not worker.wanted(steps.write_settings, {})  # a few lines of JSON: nothing to spare


def _store_files(run: Path) -> dict[str, bytes]:
    """A run's store, boundaries and built-in weights, but not job ids and creation times."""
    out = {}
    for p in sorted(run.rglob("*")):
        rel = str(p.relative_to(run))
        if not p.is_file() or "/parts/" in rel or not rel.startswith(("activations.zarr", "boundaries",
                                                                          "model/weights")):
            continue
        data = p.read_bytes()
        if rel == "activations.zarr/zarr.json":
            meta = json.loads(data)
            del meta["attributes"]["layerscope"]["jobs"]
            data = json.dumps(meta).encode()
        out[rel] = data
    return out


def test_the_workflow_in_the_worker_writes_the_bytes_it_writes_without(demo, tmp_path):
    """The demo (capture jobs in the warm worker) against the same run with LAYERSCOPE_WORKER=0."""
    wd = copy_inputs(tmp_path / "own")
    res = run_snakemake(wd, "--cores", "2", env={worker.SWITCH: "0"})
    assert res.returncode == 0, res.stderr[-3000:]
    for w, how in ((demo, "running in the warm worker"), (wd, "not in the warm worker: LAYERSCOPE_WORKER=0")):
        logs = sorted((w / "logs/demo/capture").glob("*.log")) + [w / "logs/demo/fetch_model.log"]
        # the steps after capture join the worker the captures left up and ready
        logs += [w / f"logs/demo/{step}.log" for step in ("store", "metadata", "summarize", "dashboard")]
        assert logs and all(how in f.read_text() for f in logs)
    summaries = [json.loads((w / "results/demo/summaries/summary.json").read_text()) for w in (demo, wd)]
    for s in summaries:
        del s["meta"]["created"]
    assert summaries[0] == summaries[1]
    ours, theirs = _store_files(demo / "results/demo"), _store_files(wd / "results/demo")
    assert any(k.startswith("model/weights") for k in ours) and any("/c/" in k for k in ours)
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if ours[k] != theirs[k]] == []
