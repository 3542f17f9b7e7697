"""Steps for tests/test_worker.py, run as a workflow script runs them (``run_step``) by a stand-in snakemake."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from layerscope.errors import DataError
from layerscope.worker import warm


@warm
def report(out: str, **kwargs) -> None:
    """What the step sees: its process, working directory, environment, arguments, stdio."""
    umask = os.umask(0)
    os.umask(umask)
    Path(out).write_text(json.dumps({"umask": umask,
        "pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "env": dict(os.environ), "argv": sys.argv,
        "path": sys.path,
        "kwargs": repr(kwargs), "tmpdir": tempfile.gettempdir(), "stdin": sys.stdin.read(),
    }))
    print("step stdout", flush=True)
    print("step stderr", file=sys.stderr, flush=True)


@warm(start=False)
def join(out: str) -> None:
    """``report``, as a step that runs in a running server but never starts one."""
    report(out)


@warm(when=lambda kwargs: False, prestart=True)
def prepare(out: str) -> None:
    """``report`` in its own process, starting a server for the model steps after it."""
    report(out)


@warm
def preloaded(out: str, module: str) -> None:
    """What the server's preload left in ``module``'s CALLS (its pids that called ``module.warm``)."""
    import importlib

    calls = importlib.import_module(module).CALLS
    Path(out).write_text(json.dumps({"calls": calls, "pid": os.getpid(), "ppid": os.getppid()}))


@warm
def fail(message: str) -> None:
    raise DataError(message)


@warm
def crash() -> None:
    [][1]  # noqa: B018 - an unexpected error


@warm
def exit_with(code: int) -> None:
    sys.exit(code)


@warm
def hold(tmp: str) -> None:
    """A half-written file that only the step's clean-up removes; holds until stopped."""
    part = Path(tmp)
    part.write_text(str(os.getpid()))
    try:
        while True:
            time.sleep(0.05)
    finally:
        part.unlink()


@warm
def torch_facts(out: str, threads: int) -> None:
    """Threads and random state in a forked child, and a parallel op with ``threads`` threads."""
    import torch

    facts = {"default_threads": torch.get_num_threads(), "rand": torch.rand(4).tolist(),
             "bad_fork": torch.cuda._is_in_bad_fork(), "cuda_initialized": torch.cuda.is_initialized()}
    torch.set_num_threads(threads)
    a = torch.randn(512, 512)
    for _ in range(20):  # big enough to use the intra-op pool
        a = torch.tanh(a @ a.T / 512)
    facts |= {"threads": torch.get_num_threads(), "sum": float(a.sum())}
    Path(out).write_text(json.dumps(facts))


@warm
def claim_gpu(out: str, release: str) -> None:
    """Claim a GPU as a capture job does (capture/gpus.py), say which, hold it until ``release`` exists."""
    from layerscope.capture.gpus import assign

    device = assign("cuda")
    Path(out).write_text(json.dumps({"device": device, "visible": os.environ["CUDA_VISIBLE_DEVICES"]}))
    while not os.path.exists(release):
        time.sleep(0.05)


@warm
def exits(out: str, module: str) -> None:
    """Import ``module`` (as a step imports its libraries), then register an exit handler and a
    finalizer of the step's own; each appends to ``out`` at exit."""
    import atexit
    import importlib
    import weakref

    importlib.import_module(module)

    def note(what: str) -> None:
        with open(out, "a") as f:
            f.write(f"{what} {os.getpid()}\n")

    class Held:
        pass

    global _HELD
    _HELD = Held()  # alive until the interpreter exits
    weakref.finalize(_HELD, note, "step finalizer")
    atexit.register(note, "step atexit")
