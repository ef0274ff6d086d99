"""The checks before anything trains: what would otherwise fail only after the teacher trained.

:func:`preflight` builds the models and runs every term on a probe batch; :func:`check_memory`
refuses O(n²) buffers over ``max_pairwise_mb`` before any data is loaded;
:func:`check_holdout_sizes` refuses a holdout that leaves a part too small;
:func:`check_training_forward` refuses a model whose training forward gives what the task cannot
train on. :func:`kd2m.harness.grid.run_grid` calls them in that order.
"""
from __future__ import annotations

import math

import torch

from .. import distributed as dist_ctx
from .. import tasks
from ..data import dataset_labels
from ..errors import ConfigError
from ..runtime import fork_rng
from ..training.binding import Taps, bind_terms, wanted_layers
from ..training.build import build_student
from ..training.methods import Method
from ..training.step import Step, TermFailure
from ..training.teacher import OnlineTeacher
from .config import RunConfig
from .seeds import teacher_of

__all__ = ["check_memory", "preflight", "check_training_forward", "check_holdout_sizes"]


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
    ``shared``: where a teacher that no seed trains is kept for the seeds (:func:`kd2m.harness.seeds.teacher_of`)."""
    seed = cfg.seeds[0]
    with fork_rng(device):
        teacher = teacher_of(cfg, bundle, seed, shared).to(device).eval()  # shared: kept for the seeds
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
