"""The experiment grid: seeds × (teacher, then one student per method of the configuration).

Used by ``kd2m run`` (defaults: the embedded digits data) and ``kd2m bench CONFIG`` (a grid from
a YAML file). Everything the grid will need is checked before the first epoch (:func:`preflight`);
finished runs are skipped (their ``final.json`` is the marker), and every finished run is written
to ``results.csv`` at once, so a killed grid resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings

import torch

from .. import distributed as dist_ctx
from .. import tasks
from ..atomic_io import atomic_write_json
from ..catalog import TEACHER
from ..data import build_dataset, dataset_labels
from ..errors import ConfigError, NonFiniteLossError
from ..runtime import fork_rng, resolve_device
from ..training.binding import Taps, bind_terms, wanted_layers
from ..training.build import build_student, build_teacher, freeze
from ..training.methods import Method, parse_weight
from ..training.step import Step, TermFailure
from ..training.teacher import OnlineTeacher
from . import results as R
from .config import RunConfig
from .environment import describe_environment
from .plots import plot_sweep
from .rundir import DIVERGED_JSON, FINAL_JSON, RunDir, clean_temp_files
from .tables import reference_numbers, write_reports
from .trainer import Trainer, fit

#: keys ``--sweep`` may vary, and the check each value must pass
SWEEPABLE = {"weight": (lambda v: v >= 0, "≥ 0"), "auto_weight": (lambda v: v >= 0, "≥ 0"), "lr": (lambda v: v > 0, "> 0"),
             "kd_temperature": (lambda v: v > 0, "> 0"), "weight_decay": (lambda v: v >= 0, "≥ 0")}


def sweep_variants(cfg: RunConfig, sweep: tuple[str, list] | None) -> list[tuple[RunConfig, Method]]:
    """The students of a grid as (their config, their method).

    A ``weight`` sweep varies λ of the distances only: the baselines and named students run once.
    An ``auto_weight`` sweep (the factor K of ``auto*K``) varies the distances' λ and that of every
    baseline whose λ is ``auto``: the same budget and rule for both (the baselines at a number, and
    named students, run once). What runs once runs at its λ of ``cfg``, as results.md's header says:
    a named student's entry without a ``weight`` takes the configuration's λ, not a swept one.
    Any other key (``lr``, ...) changes every student, so every student — the CE-only one
    included, or its Δ would compare against another lr — runs once per value (keys
    ``method@key=value``). The teacher always trains with the base settings."""
    if sweep is None:
        return [(cfg, m) for m in cfg.methods()]
    key, values = sweep
    check, bound = SWEEPABLE[key]
    out, seen = [], set()
    base = {m.key: m for m in cfg.methods()}
    for v in values:
        if not math.isfinite(v) or not check(v):
            raise ConfigError(f"--sweep {key}: every value must be a finite number {bound}, got {v:g}")
        lam = key in ("weight", "auto_weight")
        extra = {"weights": {k: w for k, w in cfg.weights.items() if k not in cfg.metrics}} if lam else {}
        auto_baselines = set()
        if key == "auto_weight":  # the baselines at `auto` are swept alike
            auto_baselines = {k for k, w in extra["weights"].items() if parse_weight(w)[1] and k in cfg.baselines}
            extra["weights"] = {k: (f"auto*{v:g}" if k in auto_baselines else w) for k, w in extra["weights"].items()}
            vcfg = dataclasses.replace(cfg, weight=f"auto*{v:g}", **extra)
        else:
            vcfg = dataclasses.replace(cfg, **{key: v}, **extra)
        tag = {"weight": f"{v:g}", "auto_weight": f"auto*{v:g}"}.get(key, f"{key}={v:g}")
        for m in vcfg.methods():
            swept = not lam or m.key in cfg.metrics or m.key in auto_baselines
            if swept:
                m = dataclasses.replace(m, key=f"{m.key}@{tag}")
            if m.key not in seen:
                seen.add(m.key)
                out.append((vcfg, m) if swept else (cfg, base[m.key]))
    return out


def check_memory(cfg: RunConfig, students: list[tuple[RunConfig, Method]]) -> None:
    """Refuse a term whose O(n²) buffers at the global batch would exceed ``max_pairwise_mb``
    (before any data is loaded: fail fast, not when the OS kills us)."""
    from ..metrics.memory import pairwise_bytes
    n = cfg.batch_size * (dist_ctx.world_size() if cfg.match == "global" else 1)
    for _, method in students:  # before loading any weights: fail fast
        for t in method.terms:
            need = pairwise_bytes(t.name, n) / 2**20
            if need > cfg.max_pairwise_mb:
                raise ValueError(
                    f"{method.key}: term {t.name!r} at global batch n={n} needs ~{need:.0f} MiB of O(n²) buffers, "
                    f"over --max-pairwise-mb {cfg.max_pairwise_mb:g}; use a smaller --batch-size, --match local, or "
                    "a linear-memory metric: sliced_w2, or the Gaussian ones (gauss_w2, gauss_cw2, gauss_kl, "
                    "gauss_ckl); sinkhorn is no lighter here (it also holds n×n matrices)")


def preflight(cfg: RunConfig, students: list[tuple[RunConfig, Method]], bundle, device,
              shared: dict | None = None) -> None:
    """Check, before anything trains, what would otherwise fail after the teacher trained: the
    pretrained files load into the models, every term's layers exist and have the shape it needs,
    its options build, and it gives a finite value on a probe batch. Draws no randomness the runs see.
    ``shared``: where a teacher that no seed trains is kept for the seeds (:func:`_teacher_of`)."""
    seed = cfg.seeds[0]
    with fork_rng(device):
        teacher = _teacher_of(cfg, bundle, seed, shared).to(device).eval()  # shared: kept for the seeds
        built: dict = {}

        def student_for(vcfg: RunConfig):
            """One network per distinct student spec: every method of a grid probes the same one
            (the probes run in eval mode without gradients and leave it unchanged)."""
            key = (vcfg.student, vcfg.pretrained_student, repr(vcfg.student_options))
            if key not in built:
                built[key] = build_student(vcfg, bundle, seed).to(device).eval()
            return built[key]

        k = min(8, len(bundle.train))
        items = [bundle.train[i] for i in range(k)]
        x = torch.stack([it[0] for it in items]).to(device)
        y = torch.stack([torch.as_tensor(it[1]) for it in items]).to(device)
        task = tasks.get(bundle.task)
        for vcfg in [cfg] + [v for v, _ in students]:
            if (vcfg.teacher_topk or 0) > bundle.num_classes:
                raise ConfigError(f"teacher_topk: {vcfg.teacher_topk} is more than the data's vocabulary "
                                  f"({bundle.num_classes} tokens); give at most {bundle.num_classes}")
        check_training_forward(teacher, x, bundle.num_classes, "teacher", cfg.teacher, task)
        for vcfg in {v.student: v for v, _ in students}.values() or [cfg]:
            check_training_forward(student_for(vcfg), x, bundle.num_classes, "student", vcfg.student, task)
        student_for(cfg)  # its pretrained file is checked even when no student has a term
        if not any(m.terms for _, m in students):
            return
        labels = dataset_labels(bundle.train)
        for vcfg, method in students:
            if not method.terms:
                continue
            student = student_for(vcfg)
            bound = bind_terms(method, student, teacher, x[:2], bundle.num_classes, len(bundle.train), vcfg.match,
                               labels)
            _probe_values(method, bound, student, teacher, x, y, task)


def check_training_forward(net: torch.nn.Module, x: torch.Tensor, num_classes: int, role: str, name: str,
                           task=None) -> None:
    """The training step's forward on a copy of ``net`` (train mode, then eval mode, as training and
    evaluation run it): it must give what ``task`` trains on (default classification: one (batch,
    classes) tensor of logits). Models that give a tuple
    in train mode (torchvision's googlenet and inception_v3: auxiliary classifiers) or that refuse
    the data's image size are refused here, not at the first step after the teacher has trained."""
    import copy
    task = task or tasks.get("classification")
    probe = copy.deepcopy(net)
    fix = f"{role}_options: {{aux_logits: false}}" if role in ("teacher", "student") else ""
    for mode in ("train", "eval"):
        probe.train(mode == "train")
        try:
            with torch.no_grad():
                out = probe(x[:2])
        except Exception as e:  # noqa: BLE001 (any model's own error: said in one line, with its name)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{role} {name}: fails on a batch of this dataset's {tuple(x.shape[1:])} inputs in "
                              f"{mode} mode ({reason[:160]}); choose a model for this input size (or --image-size)") \
                from None
        problem = task.check_outputs(out, 2, num_classes)
        if problem is not None:
            hint = f" in {mode} mode (auxiliary outputs); turn them off, e.g. {fix} in the config" \
                if not isinstance(out, torch.Tensor) else ""
            raise ConfigError(f"{role} {name}: {problem}{hint}")


def _probe_values(method: Method, bound, student, teacher, x, y, task) -> None:
    """Every term of ``method`` on a probe batch through the training step's forward (eval mode,
    no gradients, the terms' value checks on): an error, or a non-finite value, names the term."""
    s_taps = Taps(student, wanted_layers(bound, "student"))
    t_out = OnlineTeacher(teacher, wanted_layers(bound, "teacher"))
    step = Step(student, bound, task, teacher_out=t_out, s_taps=s_taps, device=x.device, amp=None,
                ce_weight=method.ce_weight)
    try:
        with torch.no_grad():
            try:
                out = step.forward(x, y, torch.arange(x.shape[0], device=x.device))
            except TermFailure as f:
                e = f.error
                raise ConfigError(f"{method.key}: term {f.term.config.name!r} fails on a probe batch: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            for b, v in zip(bound, out.values):
                if not torch.isfinite(v).all():
                    raise ConfigError(f"{method.key}: term {b.config.name!r} with options {b.config.option_dict} "
                                      f"gives {float(v):g} on a probe batch; check its options")
    finally:
        s_taps.remove()
        t_out.remove()


def check_holdout_sizes(bundle, fraction: float, batch_size: int, key: str = "holdout") -> None:
    """ConfigError when a holdout of ``fraction`` (the option ``key``) leaves a part too small to
    train on or to score on: under one item per class (classification: a part without some class
    teaches or scores nothing about it; one held-out image scores 0% or 100%) or under one batch
    of blocks (text, whose classes are the vocabulary)."""
    if not fraction:
        return
    n_train, n_held = len(bundle.train), len(bundle.test)
    n = n_train + n_held
    lm = bundle.task == "lm"
    need, why = (batch_size, "one batch of blocks") if lm else (bundle.num_classes, "one per class")
    if min(n_train, n_held) >= need:
        return
    lo, hi = math.ceil(1000 * need / n) / 1000, math.floor(1000 * (n - need) / n) / 1000
    fix = f"give {key} between {lo:g} and {hi:g}" if lo <= hi else "use a larger dataset"
    raise ConfigError(f"{key} {fraction:g} leaves {n_train} training and {n_held} held-out items of the {n} in the "
                      f"training split; each part needs at least {need} ({why}): {fix}")


def run_grid(cfg: RunConfig, sweep: tuple[str, list] | None = None, log=print, holdout_key: str = "holdout") -> list[dict]:
    """Run (or resume) the whole grid; return the results rows of this configuration.

    Everything is checked before anything is written (the config, the memory guard, the data,
    :func:`preflight`); rank 0 then holds the output directory's lock for the whole grid, so a
    second process into the same ``--out`` is refused at once. ``holdout_key``: the option that
    set ``cfg.holdout``, for the message refusing it (the pilot grid's is ``select_holdout``)."""
    cfg = cfg.resolved()
    out = RunDir(cfg.out)
    if cfg.threads:  # 0 = torch's default
        torch.set_num_threads(cfg.threads)
    device = dist_ctx.setup(resolve_device(cfg.device))
    students = sweep_variants(cfg, sweep)
    check_memory(cfg, students)
    if dist_ctx.is_main():
        out.check_usable()  # a foreign or newer directory is refused before any data is read
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bundle = build_dataset(cfg.dataset, data_root=cfg.data_root, download=cfg.download, image_size=cfg.image_size,
                               tokenizer=cfg.tokenizer, holdout=cfg.holdout)
    for w in caught:  # e.g. imagefolder's chosen size: one line, not a Python warning
        log(f"kd2m: note: {w.message}")
    check_holdout_sizes(bundle, cfg.holdout, cfg.batch_size, holdout_key)
    shared: dict = {}  # a teacher that no seed trains: the one preflight builds, for every seed
    preflight(cfg, students, bundle, device, shared)
    lock = out.locked() if dist_ctx.is_main() else contextlib.nullcontext()
    with lock:
        if dist_ctx.is_main():
            clean_temp_files(out.root)  # what a killed atomic write left behind
            atomic_write_json(out.config_json, cfg.to_dict())
            atomic_write_json(out.env_json, describe_environment())
        return _run_seeds(cfg, students, bundle, device, out, sweep, log, shared)


def _run_seeds(cfg, students, bundle, device, out: RunDir, sweep, log, shared: dict | None = None) -> list[dict]:
    csv_path = out.results_csv
    rows = R.read_rows(csv_path)
    failures: list[str] = []  # errors of diverged students: the grid finishes the others first
    t_start = time.perf_counter()
    workers = min(cfg.parallel or 1, len(cfg.seeds)) if not dist_ctx.is_distributed() else 1
    if workers > 1:
        if shared is not None:
            shared.clear()  # each worker builds its own: this process need not hold one through the grid
        # Seeds are independent (each run seeds itself), so they train in separate processes, one
        # CPU thread each; this process alone writes results.csv and holds the directory's lock.
        # each worker's first seed calibrates its `weight: auto` students before training any
        jobs = {seed: (cfg, students, seed, str(out.root), str(device), i < workers) for i, seed in enumerate(cfg.seeds)}
        fresh = _collect(_parallel_seeds(jobs, workers), rows, csv_path, t_start, log, failures, tasks.get(bundle.task))
    else:
        shared = {} if shared is None else shared  # a teacher that no seed trains, built once for all of them
        results = ((seed, _train_seed(cfg, students, bundle, device, out, seed, precheck_auto=seed == cfg.seeds[0],
                                      shared=shared))
                   for seed in cfg.seeds)
        fresh = _collect(results, rows, csv_path, t_start, log, failures, tasks.get(bundle.task))
    own = _settle_rows(csv_path, fresh, {TEACHER} | {m.key for _, m in students}, cfg.seeds) \
        if dist_ctx.is_main() else fresh
    diverged = {}  # method key -> its label and the seeds whose run diverged (each diverged.json says where)
    for _, m in students:
        seeds = [s for s in cfg.seeds if (out.run(m.key, s) / DIVERGED_JSON).exists()]
        if seeds:
            diverged[m.key] = {"label": m.label, "seeds": seeds}
    if dist_ctx.is_main():
        write_reports(out.root, own, cfg.dataset, header=_header(cfg, students, sweep), expected_seeds=len(cfg.seeds),
                      reference=reference_numbers(cfg.dataset, cfg.teacher, cfg.student), diverged=diverged)
        if sweep is not None:
            plot_sweep(own, sweep[0], out.sweep_png)
    if failures:  # every other run has finished and the tables are written: now the one-line error (exit 2)
        more = f" (and {len(failures) - 1} more diverged run(s), flagged in results.md)" if len(failures) > 1 else ""
        raise NonFiniteLossError(failures[0] + more)
    return own


def _collect(results, rows: list[dict], csv_path, t_start: float, log, failures: list, task) -> list[dict]:
    """Write each finished run's row (as each seed completes) and log it; a diverged run's error
    goes to ``failures``. Returns this grid's rows, as its runs' final.json say."""
    fresh = []
    for seed, runs in results:
        for row, label, earlier in runs:
            if isinstance(row, str):  # diverged: no row; the error, raised once the grid has finished
                log(f"[{time.perf_counter() - t_start:7.1f}s] seed {seed} {label:<24} diverged")
                failures.append(row)
                continue
            fresh.append(_csv_view(row))
            if dist_ctx.is_main() and not any(r == {**r, **_csv_view(row)} for r in rows):
                rows = R.upsert(csv_path, row)  # new, or its row changed (a run redone after its directory was deleted)
            log(f"[{time.perf_counter() - t_start:7.1f}s] seed {seed} {label:<24} "
                f"{task.describe(row)}" + ("  (finished earlier)" if earlier else ""))
    return fresh


def _settle_rows(csv_path, fresh: list[dict], keys: set, seeds: list) -> list[dict]:
    """results.csv with this grid's rows exactly as its run directories say (their final.json are
    the truth): a hand-edited or duplicate row of one of its runs, or the row of a run that has
    since diverged, is dropped; rows of other methods or seeds are kept. Returns ``fresh``."""
    mine = {R.row_key(r) for r in fresh}
    kept = [r for r in R.read_rows(csv_path)
            if R.row_key(r) not in mine and not (r["method"] in keys and r["seed"] in seeds)]
    if R.read_rows(csv_path) != kept + fresh:
        R.write_rows(csv_path, kept + fresh)
    return fresh


def _parallel_seeds(jobs: dict, workers: int):
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


def check_auto_weights(students, bundle, device, out: RunDir, seed: int, teacher, caches: dict) -> None:
    """Calibrate every unfinished ``weight: auto`` student of ``seed`` against the trained teacher
    before any student trains, so that a term calibration refuses (a zero or vanishing gradient)
    ends the grid now, not when that student's turn comes after the others have trained. Draws no
    randomness the runs see; changes no weights (calibration restores what it touches)."""
    for vcfg, method in students:
        if not any(t.auto for t in method.terms) or (out.run(method.key, seed) / FINAL_JSON).exists():
            continue
        with fork_rng(device):
            trainer = Trainer(build_student(vcfg, bundle, seed), bundle, vcfg, method, seed, out.run(method.key, seed),
                              device, teacher=teacher, teacher_caches=caches)
            try:
                trainer._setup()
            finally:
                trainer.remove_hooks()


def _teacher_of(cfg, bundle, seed: int, shared: dict | None) -> torch.nn.Module:
    """The seed's teacher. A pretrained one that no epoch trains is its file's weights whatever
    the seed: built once and shared by the seeds of this process (``shared``; frozen, so no seed
    changes it), not loaded again per seed."""
    if shared is None or not (cfg.pretrained_teacher and cfg.teacher_epochs == 0):
        return build_teacher(cfg, bundle, seed)
    if "teacher" not in shared:
        shared["teacher"] = build_teacher(cfg, bundle, seed)
    return shared["teacher"]


def _train_seed(cfg, students, bundle, device, out: RunDir, seed: int,
                precheck_auto: bool = True, shared: dict | None = None) -> list[tuple[dict | str, str, bool]]:
    """Teacher, then every student of one seed; (results row, label, finished earlier) per run.

    Every run goes through fit(): a finished one returns its final.json at once after checking
    that it was made with the same settings (so a resumed grid redoes nothing, and a changed
    config never silently reuses old results). A student whose loss goes non-finite is recorded
    (its ``diverged.json``; the row is the reason, a string) and the grid goes on: in a λ sweep
    the largest λ diverging is a result, not the end of the sweep. A diverging teacher stops it."""
    teacher = _teacher_of(cfg, bundle, seed, shared)
    # the teacher's outputs, built once for all the students that read them (teacher_cache > 0): a
    # teacher shared by the seeds shares its tables too (their key holds the views' seed where it matters)
    caches: dict = shared.setdefault("caches", {}) if shared is not None and shared.get("teacher") is teacher else {}
    runs = []
    for vcfg, method in [(cfg, Method(TEACHER))] + students:
        if not method.is_teacher and precheck_auto:
            precheck_auto = False
            check_auto_weights(students, bundle, device, out, seed, teacher, caches)
        run_dir = out.run(method.key, seed)
        earlier = (run_dir / FINAL_JSON).exists()
        if method.is_teacher:
            res = fit(teacher, bundle, cfg.teacher_config(), method, seed, run_dir, device,
                      epochs=cfg.teacher_epochs, desc=f"teacher s{seed}")
            freeze(teacher)
        else:
            try:
                res = fit(build_student(vcfg, bundle, seed), bundle, vcfg, method, seed, run_dir, device,
                          teacher=teacher, desc=f"{method.key} s{seed}", load_finished=False,
                          teacher_caches=caches)
            except NonFiniteLossError as e:
                runs.append((str(e), method.label, False))
                continue
        # keyed by where the run lives in this grid, not by the key its final.json was written under
        # (a run directory copied under a sweep variant's name, e.g. `cw2` → `cw2@auto*1`, is that variant)
        row = {**res, "method": method.key, "dataset": cfg.dataset, "label": method.label,
               "run_dir": str(run_dir.relative_to(out.root))}
        runs.append((row, method.label, earlier))
    return runs


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
    return _train_seed(cfg, students, bundle, torch.device(device), RunDir(root), seed, precheck_auto,
                       shared=_WORKER_SHARED)


#: a seed worker's teacher shared by the seeds it trains (:func:`_teacher_of`); a worker serves one grid
_WORKER_SHARED: dict = {}


def _csv_view(row: dict) -> dict:
    """``row`` as results.csv reads it back (its columns, numbers as numbers)."""
    return R.typed_row({k: row.get(k) for k in R.FIELDS + R.LM_FIELDS})


def _header(cfg: RunConfig, students: list | None = None, sweep=None) -> str:
    """results.md's first lines: the recipe, and every student's λ as it trained (``students``, of
    :func:`sweep_variants`; a swept key other than λ is named with its values)."""
    sched = (f"cosine → {cfg.lr_min:g}" if cfg.lr_schedule == "cosine" else
             f"×{cfg.lr_gamma:g} at epochs {', '.join(map(str, cfg.lr_milestones))}")
    swept = (f", students' {sweep[0]} swept: {', '.join(f'{v:g}' for v in sweep[1])}"
             if sweep is not None and sweep[0] not in ("weight", "auto_weight") else "")
    methods = [m for _, m in students] if students is not None else cfg.methods()
    return (f"# kd2m results: {cfg.dataset}\n\nteacher `{cfg.teacher}` → student `{cfg.student}`, "
            f"{cfg.epochs} epochs (teacher {cfg.teacher_epochs}), batch {cfg.batch_size}, lr {cfg.lr:g} {sched}"
            f"{swept}, λ: {_weights_text(methods)}, seeds {cfg.seeds}."
            + (f" **Scored on a holdout of {cfg.holdout:g} of the training split** (trained on the rest, the "
               "teacher too), not on the test split." if cfg.holdout else ""))


def _weights_text(methods: list) -> str:
    """Every student's λ, as it trained (one λ when they share it), and its CE weight where not 1."""
    parts = []
    for m in methods:
        if m.terms:
            parts.append(f"{m.key} " + " + ".join(("auto×" if t.auto else "") + f"{t.weight:g}" for t in m.terms)
                         + (f" (CE×{m.ce_weight:g})" if m.ce_weight != 1.0 else ""))
    lams = {p.split(" ", 1)[1] for p in parts}
    if len(lams) == 1:
        return lams.pop()
    return ", ".join(parts)
