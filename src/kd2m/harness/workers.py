"""``--parallel``: the seeds of a grid trained in spawned worker processes, one seed at a time each.

The grid's process alone writes results.csv and holds the output directory's lock; a worker
trains a seed (:func:`kd2m.harness.seeds.train_seed`) and sends back its rows, or its error.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..data import build_dataset
from .rundir import RunDir
from .seeds import train_seed

__all__ = ["parallel_seeds", "WorkerDiedError"]


def parallel_seeds(jobs: dict, workers: int):
    """(seed, runs) of every job, as each finishes, computed by ``workers`` spawned processes.

    Each worker takes one seed at a time over its own pipe, so the parent always knows which seed
    a worker holds: a worker that dies without answering (SIGKILL, the OOM killer) ends the grid
    with one line naming that seed — ``multiprocessing.Pool`` would wait for it forever. An
    exception inside a worker is raised here as it was raised there."""
    import multiprocessing as mp
    from multiprocessing.connection import wait
    ctx = mp.get_context("spawn")
    todo = list(jobs)
    procs = []
    try:
        for _ in range(min(workers, len(todo))):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_loop, args=(child,), daemon=True)
            p.start()
            child.close()
            procs.append([p, parent, None])
        for w in procs:
            w[2] = todo.pop(0)
            w[1].send(jobs[w[2]])
        while any(w[2] is not None for w in procs):
            busy = [w for w in procs if w[2] is not None]
            ready = wait([w[1] for w in busy] + [w[0].sentinel for w in busy])
            for w in busy:
                p, conn, seed = w
                try:
                    if conn in ready or conn.poll():
                        status, value = conn.recv()
                    elif p.sentinel in ready:
                        status, value = "died", None
                    else:
                        continue
                except (EOFError, OSError):  # a killed worker's pipe: EOF, or ECONNRESET mid-message
                    status, value = "died", None
                if status == "died":
                    p.join(1)
                    how = f"killed by signal {-p.exitcode}" if (p.exitcode or 0) < 0 else f"exit code {p.exitcode}"
                    raise WorkerDiedError(
                        f"the worker training seed {seed} died ({how}; SIGKILL is what the out-of-memory killer "
                        "sends); the runs that finished are kept: rerun the same command to resume, with "
                        "--parallel 1 if memory is short")
                if status == "error":
                    raise value
                w[2] = todo.pop(0) if todo else None
                if w[2] is not None:
                    conn.send(jobs[w[2]])
                yield seed, value
    finally:
        for p, conn, _ in procs:
            with contextlib.suppress(OSError):
                conn.send(None)
            p.join(0.5)
            if p.is_alive():
                p.kill()
                p.join()


class WorkerDiedError(RuntimeError):
    """A --parallel seed worker died without a result; the message names the seed."""


def _worker_loop(conn) -> None:
    """A seed worker: one job at a time from ``conn`` (None: stop), its result or error back."""
    _worker_init()
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            conn.send(("ok", _seed_worker(job)))
        except BaseException as e:  # noqa: BLE001 (sent back to be raised in the grid's process)
            conn.send(("error", _sendable(e)))


def _sendable(e: BaseException) -> BaseException:
    """``e`` if it survives a pickle round trip (what the grid's process receives), else a
    RuntimeError with its type and text: an exception whose constructor takes other arguments
    than its message pickles but fails to unpickle, which would replace the worker's error with
    a TypeError about that constructor."""
    import pickle
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 (any failure to pickle or unpickle)
        return RuntimeError(f"{type(e).__name__}: {e}")


def _worker_init() -> None:
    """A seed worker dies with the grid's process (Linux): a killed grid leaves no orphan writing
    into the output directory while a rerun holds its lock."""
    import signal
    import sys
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _seed_worker(job) -> list[tuple[dict, str, bool]]:
    cfg, students, seed, root, device, precheck_auto = job
    torch.set_num_threads(max(cfg.threads or 1, 1))
    bundle = build_dataset(cfg.dataset, data_root=cfg.data_root, download=False, image_size=cfg.image_size,
                           tokenizer=cfg.tokenizer, holdout=cfg.holdout)
    cfg = dataclasses.replace(cfg, progress=False)
    students = [(dataclasses.replace(v, progress=False), m) for v, m in students]
    return train_seed(cfg, students, bundle, torch.device(device), RunDir(root), seed, precheck_auto,
                      shared=_WORKER_SHARED)


#: a seed worker's teacher shared by the seeds it trains (:func:`kd2m.harness.seeds.teacher_of`); a worker serves one grid
_WORKER_SHARED: dict = {}
