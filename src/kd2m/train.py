"""The engine: one training loop for teachers, CE-only students and distilled students.

A run optimises ``w_CE · CE + Σ_k λ_k(epoch) · term_k`` (:class:`~kd2m.methods.Method`, terms from the
one registry :mod:`kd2m.losses`). Every student of a seed shares the same initial weights, data
order, optimizer and schedule; only the terms differ. Each epoch ends with an atomic
checkpoint; a killed run resumes from the last one and, on CPU with deterministic algorithms,
finishes bit-identical to an uninterrupted run.

Pieces: :class:`TeacherOutputs` (the teacher's features and logits for a batch, online or from
the :mod:`~kd2m.teacher_cache`), :class:`Trainer` (one run's state: model, terms, optimizer,
schedule, taps, loaders) and :func:`fit` (train or resume one run, return its result).
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from . import distributed as dist_ctx
from . import losses
from . import monitor as watch
from .atomic_io import atomic_write_json, atomic_write_text, load_checkpoint, read_json, save_checkpoint
from .config import ConfigError, RunConfig
from .data import dataset_labels
from .features import PENULTIMATE, FeatureTap, last_linear_name
from .methods import Method, TermConfig, cache_problem
from .metrics._base import NonFiniteInputError
from .models import build_model, load_pretrained
from .models.pretrained import weights_identity
from . import value_checks
from .step import EpochTally, forward_terms, zero_nonfinite_gradients
from .runtime import amp_dtype, progress, resolve_device, seed_everything, to_device  # noqa: F401 (resolve_device: re-exported)
from .rundir import CHECKPOINT_PT, DIVERGED_JSON, FINAL_JSON, LOG_JSONL, MODEL_PT
from .teacher_cache import FixedViews, ViewSampler, build_teacher_cache


class NonFiniteLossError(ValueError):
    """The training loss (or the matched features) became NaN/inf; the last good checkpoint is kept.
    A ValueError: the user fixes it (a lower lr or λ), so the CLI exits 2 with one line.

    ``where``: the bare cause (epoch, step, values), recorded in the run's ``diverged.json``, so a
    grid can report the run as diverged and go on (:func:`kd2m.grid.run_grid`)."""

    def __init__(self, message: str, where: str | None = None):
        super().__init__(message)
        self.where = where or message


class IndexedDataset(Dataset):
    """``(x, y)`` items as ``(x, y, index)``: the key the engine passes on (CRD's memory bank),
    the same item shape as :class:`~kd2m.teacher_cache.FixedViews` (whose key is ``index·K + view``)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, y = self.base[index]
        return x, y, index


def make_loaders(bundle, cfg: RunConfig, seed: int, device: torch.device, views: FixedViews | None = None):
    """Train loader of ``(x, y, key)`` with a seeded shuffle (DistributedSampler under torchrun)
    and a test loader of ``(x, y)``.

    With ``views`` (the teacher cache) the keys are those of the views (``index·K + view``): the
    same image order, each image in the view :class:`ViewSampler` picks for the epoch; without,
    the key is the image's index."""
    g = torch.Generator().manual_seed(seed)
    pin = device.type == "cuda"
    workers = cfg.num_workers or 0
    # Workers are not persistent: a DataLoader iterator draws its workers' base seed when it is
    # created (train: from `g`; test: from the global RNG, which also drives dropout). Created
    # every epoch, those draws are the same in a resumed run as in the uninterrupted one; a
    # persistent iterator draws once, in the first epoch a process runs, so after a resume every
    # later shuffle, crop and dropout mask would shift. Costs a worker start per epoch.
    common = dict(num_workers=workers, pin_memory=pin, persistent_workers=False)
    if dist_ctx.is_distributed():
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(bundle.train, shuffle=True, seed=seed)
        test_sampler = DistributedSampler(bundle.test, shuffle=False, drop_last=False)
        test = DataLoader(bundle.test, batch_size=512, sampler=test_sampler, **common)
    else:
        sampler = RandomSampler(bundle.train, generator=g)  # what shuffle=True builds
        test = DataLoader(bundle.test, batch_size=512, shuffle=False, **common)
    if views is not None:
        train = DataLoader(views, batch_size=cfg.batch_size, sampler=ViewSampler(sampler, views.views, views.seed),
                           generator=g, **common)
    else:
        train = DataLoader(IndexedDataset(bundle.train), batch_size=cfg.batch_size, sampler=sampler, generator=g,
                           **common)
    return train, test


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, channels_last: bool = False) -> float:
    """Accuracy counted over every test sample (not a mean of per-batch accuracies).

    Under DDP the DistributedSampler pads the test set to a multiple of the world size; the
    few duplicated samples are counted, as torch's own reference scripts do.
    """
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)  # counted on the device: one read at the end
    total = 0
    for x, y in loader:
        x, y = to_device(x, device, channels_last), y.to(device, non_blocking=True)
        correct += (model(x).argmax(1) == y).sum()
        total += y.numel()
    counts = dist_ctx.all_reduce_tensor(torch.stack([correct, correct.new_tensor(total)]), "sum").tolist()
    return counts[0] / max(counts[1], 1)


def _rng_state(loader) -> dict:
    # numpy's state as a tensor: weights_only loading accepts tensors, not numpy arrays
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "numpy_pos": int(np.random.get_state()[2]), "python": json.dumps(random.getstate()),
            "loader": loader.generator.get_state() if loader.generator is not None else None}


def _set_rng_state(state: dict, loader) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("loader") is not None and loader.generator is not None:
        loader.generator.set_state(state["loader"])


_INIT_SEED = {"student": 1_000_003, "teacher": 2_000_003}


def build_net(cfg: RunConfig, bundle, seed: int, role: str) -> nn.Module:
    """The seed's ``role`` ("student" or "teacher") network, freshly initialised (or from its
    ``pretrained_<role>`` file): the same weights for every method of that seed."""
    torch.manual_seed(_INIT_SEED[role] * (seed + 1))
    model = build_model(getattr(cfg, role), bundle.num_classes, bundle.in_channels, bundle.image_size,
                        **(getattr(cfg, f"{role}_options") or {}))
    weights = getattr(cfg, f"pretrained_{role}")
    if weights:
        # A student may start from a backbone under a new head (its training learns the head); a
        # teacher may only if it is trained here: with --teacher-epochs 0 a random head would be
        # distilled from as if it were the teacher (its accuracy at chance), so its head must load.
        head_learned = role == "student" or cfg.teacher_epochs > 0
        load_pretrained(model, weights, new_head=head_learned, on_new_head=_say_once)
    return model


_SAID: set = set()


def _say_once(message: str) -> None:
    """One line on stderr, once per process (a grid builds the same network once per seed)."""
    if message not in _SAID:
        _SAID.add(message)
        print(f"kd2m: {message}", file=sys.stderr)


def build_student(cfg: RunConfig, bundle, seed: int) -> nn.Module:
    return build_net(cfg, bundle, seed, "student")


def build_teacher(cfg: RunConfig, bundle, seed: int) -> nn.Module:
    return build_net(cfg, bundle, seed, "teacher")


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def run_settings(cfg: RunConfig, method: Method, seed: int, epochs: int, teacher=None,
                 threads: int | None = None) -> dict:
    """Everything that decides a run's result; stored with it so that a resume or a skip never
    silently reuses a run made with other settings (e.g. `kd2m run --epochs 1`, then `kd2m run`).
    ``threads``: torch's CPU thread count of a CPU run (its reductions' order, so its last bits:
    a ``--parallel`` worker's one thread is not a sequential run's sixteen); stored when not 1."""
    role = "teacher" if method.is_teacher else "student"
    s = {"dataset": cfg.dataset, "model": getattr(cfg, role), "pretrained": _weights_id(getattr(cfg, f"pretrained_{role}")),
         "model_options": getattr(cfg, f"{role}_options"),
         "epochs": epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "lr_min": cfg.lr_min,
         "lr_schedule": cfg.lr_schedule, "lr_milestones": cfg.lr_milestones, "lr_gamma": cfg.lr_gamma,
         "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "amp": cfg.amp, "seed": seed,
         "world_size": dist_ctx.world_size(), "image_size": cfg.image_size}
    if teacher is not None and method.uses_teacher:
        s.update(teacher=cfg.teacher, teacher_options=cfg.teacher_options, teacher_epochs=cfg.teacher_epochs,
                 pretrained_teacher=_weights_id(cfg.pretrained_teacher), teacher_lr=cfg.teacher_lr,
                 match=cfg.match, terms=[t.describe() for t in method.terms])
        if cfg.teacher_cache:
            s.update(teacher_cache=cfg.teacher_cache)  # K fixed views: other augmentations than online
    elif method.terms:
        s.update(terms=[t.describe() for t in method.terms])
    if method.ce_weight != 1.0:  # only when set: runs made before CE had a weight keep their settings
        s.update(ce_weight=method.ce_weight)
    if threads is not None and threads != 1:  # one thread (the digits' and MNIST-1D's default) as before
        s.update(threads=threads)
    return json.loads(json.dumps(s))  # the form it has once read back from disk (tuples -> lists)


def _weights_id(path):
    """A weights file as the settings hold it: its content's digest, not its name."""
    return weights_identity(path) if path else None


def make_scheduler(opt, cfg: RunConfig, epochs: int):
    """The run's learning-rate schedule, stepped once per epoch (identical for every method of a grid):
    cosine from lr to lr_min over all epochs, or ×lr_gamma at each of lr_milestones (the CRD protocol)."""
    if cfg.lr_schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.lr_milestones), gamma=cfg.lr_gamma)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=min(cfg.lr_min, cfg.lr))


def check_settings(run_dir: Path, stored: dict | None, current: dict) -> None:
    if stored is None:
        return
    diff = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    if diff:
        what = "; ".join(f"{k} {stored.get(k)!r:.60} there, {current.get(k)!r:.60} now" for k in diff[:4])
        raise ConfigError(f"{run_dir} holds a run made with other settings ({what}); "
                          "use another --out, or delete that directory to redo it")


# ----------------------------------------------------------------------------------------------
# Layers and terms


def map_layer(model: nn.Module, example: Tensor) -> str:
    """The default layer of a map term: the model's last 4-D feature map (found by hooks)."""
    from .features import last_map_layer
    return last_map_layer(model, example)


class BoundTerm:
    """One term of a run: its config, its module, the layers it reads, and the key it is logged under."""

    def __init__(self, config: TermConfig, module: nn.Module, student_layer: str, teacher_layer: str, key: str):
        self.config, self.module, self.key = config, module, key
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.needs = config.spec.needs
        self.raw = config.uses_maps  # reads raw maps/tokens, not pooled features

    def inputs(self, s_feats: dict, t_feats: dict, y: Tensor, logits: Tensor, t_logits, index) -> dict:
        kw = {}
        if self.needs & {"feats", "maps"}:
            kw["student_feats"] = s_feats[(self.student_layer, self.raw)]
            kw["teacher_feats"] = t_feats[(self.teacher_layer, self.raw)].detach()
        if "logits" in self.needs:
            kw["student_logits"], kw["teacher_logits"] = logits, t_logits.detach()
        if "labels" in self.needs:
            kw["labels"] = y
        if "index" in self.needs:
            kw["index"] = index
        return kw


def _layers(model: nn.Module, example: Tensor, terms, side: str) -> dict:
    """The layer each term reads on ``side`` ("student" or "teacher"), resolved to a module path."""
    out, found_map = {}, None
    for t in terms:
        layer = getattr(t, f"{side}_layer")
        if layer is None:
            if t.uses_maps:
                found_map = found_map or map_layer(model, example)
                layer = found_map
            else:
                layer = PENULTIMATE
        out[id(t)] = layer
    return out


class Taps:
    """Forward hooks on the layers a run's terms read: pooled ``(n, d)`` and raw (maps, tokens) by layer."""

    def __init__(self, model: nn.Module, wanted: set):
        pooled = sorted({layer for layer, raw in wanted if not raw})
        raw = sorted({layer for layer, raw in wanted if raw})
        self.pooled = FeatureTap(model, pooled) if pooled else None
        self.raw = FeatureTap(model, raw, pool="none") if raw else None

    def features(self) -> dict:
        out = {}
        for tap, raw in ((self.pooled, False), (self.raw, True)):
            if tap is None:
                continue
            for layer in tap.layers:
                if layer not in tap.features:
                    raise RuntimeError("no features recorded yet: run a forward pass first")
                out[(layer, raw)] = tap.features[layer]
        return out

    def remove(self) -> None:
        for tap in (self.pooled, self.raw):
            if tap is not None:
                tap.remove()


def _shape(x: Tensor) -> tuple:
    return tuple(x.shape[1:])


@torch.no_grad()
def _probe(model: nn.Module, x: Tensor, wanted: set) -> tuple[dict, Tensor]:
    """Features and logits of one eval-mode forward on ``x``, leaving the RNG and BN statistics alone."""
    if not wanted:
        return {}, None
    was_training = model.training
    taps = Taps(model, wanted)
    try:
        with torch.random.fork_rng(devices=[]):
            model.eval()
            logits = model(x)
        return taps.features(), logits
    finally:
        taps.remove()
        model.train(was_training)


def bind_terms(method: Method, student: nn.Module, teacher: nn.Module | None, example: Tensor,
               num_classes: int, num_data: int, match: str = "global",
               train_labels: Tensor | None = None) -> list[BoundTerm]:
    """Build ``method``'s term modules with the shapes they need (from one probe forward on
    ``example``), each with its resolved layers; any error names the method and the term.
    ``match``: where the distances see the batch under torchrun ("global" or "local").
    ``train_labels``: every training sample's label (:func:`kd2m.data.dataset_labels`), or None."""
    if not method.terms:
        return []
    if teacher is None:
        raise ConfigError(f"{method.key}: its terms need a teacher")
    s_layers = _layers(student, example, method.terms, "student")
    t_layers = _layers(teacher, example, method.terms, "teacher")
    s_want = {(s_layers[id(t)], t.uses_maps) for t in method.terms if t.spec.needs & {"feats", "maps"}}
    t_want = {(t_layers[id(t)], t.uses_maps) for t in method.terms if t.spec.needs & {"feats", "maps"}}
    s_feats, _ = _probe(student, example, s_want)
    t_feats, _ = _probe(teacher, example, t_want)
    head = dict(teacher.named_modules())[last_linear_name(teacher)].weight.detach()
    bound = []
    for t in method.terms:
        sl, tl = s_layers[id(t)], t_layers[id(t)]
        s_x, t_x = s_feats.get((sl, t.uses_maps)), t_feats.get((tl, t.uses_maps))
        if t.spec.needs_maps and s_x is not None and (s_x.dim() != 4 or t_x.dim() != 4):
            raise ConfigError(f"{method.key}: term {t.name!r} needs (n, c, h, w) feature maps; layer {sl!r} of the "
                              f"student gives {tuple(s_x.shape)} and layer {tl!r} of the teacher {tuple(t_x.shape)}")
        ctx_fields = dict(student_shape=_shape(s_x) if s_x is not None else None,
                          teacher_shape=_shape(t_x) if t_x is not None else None,
                          num_classes=num_classes, num_data=num_data, teacher_head=head,
                          train_labels=train_labels)
        options = t.option_dict
        if t.spec.family == "kd2m" and "match" in t.spec.options:
            options.setdefault("match", match)
        if t.unit != "batch":
            options["unit"] = t.unit
        try:
            module = losses.get(t.name, losses.TermContext(**ctx_fields), **options)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{method.key}: {e}") from None
        bound.append(BoundTerm(t, module, sl, tl, None))
    for b, key in zip(bound, term_keys([(b.config.name, b.student_layer) for b in bound])):
        b.key = key
    return bound


def term_keys(terms: list[tuple[str, str]]) -> list[str]:
    """One distinct log key per (name, student layer) of a student's terms: the name where it is
    unique, ``name@layer`` where the name repeats over layers, and ``name@layer#i`` (1-based) where
    a name repeats on one layer — two terms must never share a key, or log.jsonl and
    ``auto_scales`` would hold their sum and the last λ."""
    names = [n for n, _ in terms]
    keys = [n if names.count(n) == 1 else f"{n}@{layer}" for n, layer in terms]
    seen: dict[str, int] = {}
    out = []
    for k in keys:
        if keys.count(k) > 1:
            seen[k] = seen.get(k, 0) + 1
            out.append(f"{k}#{seen[k]}")
        else:
            out.append(k)
    return out


# ----------------------------------------------------------------------------------------------
# The teacher's outputs


class TeacherOutputs:
    """The teacher's features (by layer) and logits for a batch: run online, or looked up in a cache."""

    #: runs the teacher on the batch (under the step's autocast), rather than looking it up by key
    online = True

    def __call__(self, x: Tensor, key: Tensor) -> tuple[dict, Tensor]:
        raise NotImplementedError

    def remove(self) -> None:
        pass


class OnlineTeacher(TeacherOutputs):
    """Runs the frozen teacher on every batch (under the run's autocast) and reads its taps."""

    def __init__(self, teacher: nn.Module, wanted: set):
        self.teacher = teacher
        self.taps = Taps(teacher, wanted)

    def __call__(self, x, key):
        with torch.no_grad():
            logits = self.teacher(x)
        return self.taps.features(), logits

    def remove(self) -> None:
        self.taps.remove()


class CachedTeacher(TeacherOutputs):
    """Looks the teacher's outputs up by key in a :class:`~kd2m.teacher_cache.TeacherCache`."""

    online = False

    def __init__(self, cache, layer: str):
        self.cache, self.layer = cache, layer

    def __call__(self, x, key):
        feats, logits = self.cache.lookup(key)
        return {(self.layer, False): feats}, logits


def _cached_layer(cfg: RunConfig, method: Method, bound: list[BoundTerm]) -> str:
    """The one pooled teacher layer a cache holds for ``method`` (refused up front by RunConfig.resolved
    when a method needs more; checked again here for runs built through the API)."""
    problem = cache_problem(method)
    if problem:
        raise ConfigError(f"teacher_cache: {problem}")
    layers = {b.teacher_layer for b in bound if "feats" in b.needs}
    return layers.pop() if layers else cfg.teacher_layer


def _teacher_cache(teacher, views: FixedViews, layer: str, cfg: RunConfig, device, memo: dict | None):
    key = (id(teacher), views.views, views.seed, layer, cfg.amp, cfg.channels_last)
    if memo is not None and key in memo:
        return memo[key]
    with torch.random.fork_rng(devices=[]):  # building draws no randomness the training run would see
        cache = build_teacher_cache(teacher, views, layer, device, amp_dtype=amp_dtype(cfg.amp),
                                    channels_last=cfg.channels_last, num_workers=cfg.num_workers or 0,
                                    show_progress=cfg.progress and dist_ctx.is_main(), max_mb=cfg.max_cache_mb)
    if memo is not None:
        memo[key] = cache
    return cache


# ----------------------------------------------------------------------------------------------
# One run


class Trainer:
    """One run's state: the model, its terms, optimizer, schedule, loaders and the teacher's outputs.

    ``Trainer(...).fit()`` trains (or resumes) and returns the result; see :func:`fit`.
    """

    def __init__(self, model: nn.Module, bundle, cfg: RunConfig, method: Method, seed: int, run_dir: Path,
                 device: torch.device, teacher: nn.Module | None = None, epochs: int | None = None,
                 desc: str = "", teacher_caches: dict | None = None):
        self.model, self.bundle, self.cfg, self.method, self.seed = model, bundle, cfg, method, seed
        self.run_dir, self.device, self.desc = Path(run_dir), device, desc
        self.teacher = teacher if method.uses_teacher else None
        self.reference_teacher = teacher  # what kd2m.monitor compares every student with (CE-only included)
        self.epochs = cfg.epochs if epochs is None else epochs
        self.teacher_caches = teacher_caches
        self.settings = run_settings(cfg, method, seed, self.epochs, self.teacher,
                                     threads=torch.get_num_threads() if device.type == "cpu" else None)
        self.final_path = self.run_dir / FINAL_JSON
        self.diverged_path = self.run_dir / DIVERGED_JSON
        self.ckpt_path = self.run_dir / CHECKPOINT_PT
        self.log_path = self.run_dir / LOG_JSONL

    # -- setup ---------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg, device, model = self.cfg, self.device, self.model
        seed_everything(self.seed + 1000 * dist_ctx.rank())  # augmentation differs per rank; DDP syncs weights
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        example = self.bundle.train[0][0].unsqueeze(0).repeat(2, *([1] * self.bundle.train[0][0].dim()))
        example = to_device(example, device, cfg.channels_last)
        self.terms = bind_terms(self.method, model, self.teacher, example, self.bundle.num_classes,
                                len(self.bundle.train), cfg.match, dataset_labels(self.bundle.train))
        for b in self.terms:
            b.module.to(device)
        cache = None
        self.views = 1
        if self.teacher is not None and cfg.teacher_cache:
            layer = _cached_layer(cfg, self.method, self.terms)
            views = FixedViews(self.bundle.train, cfg.teacher_cache, self.seed)
            cache = _teacher_cache(self.teacher, views, layer, cfg, device, self.teacher_caches)
            self.train_loader, self.test_loader = make_loaders(self.bundle, cfg, self.seed, device, views=views)
            self.teacher_out = CachedTeacher(cache, layer)
            self.views = cfg.teacher_cache
        else:
            self.train_loader, self.test_loader = make_loaders(self.bundle, cfg, self.seed, device)
            want = {(b.teacher_layer, b.raw) for b in self.terms if b.needs & {"feats", "maps"}}
            self.teacher_out = OnlineTeacher(self.teacher, want) if self.teacher is not None else None
        params = list(model.parameters()) + [p for b in self.terms for p in b.module.parameters()]
        self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.sched = make_scheduler(self.opt, cfg, self.epochs)
        want = {(b.student_layer, b.raw) for b in self.terms if b.needs & {"feats", "maps"}}
        self.s_taps = Taps(model, want) if want else None
        from .auto_weight import calibrate
        self.scales = calibrate(self)  # λ multipliers of `weight: auto` terms (1 for the others)

    def _resume(self) -> tuple[list, int, float]:
        if not self.ckpt_path.exists():
            return [], 0, 0.0
        state = load_checkpoint(self.ckpt_path)
        check_settings(self.run_dir, json.loads(state["settings"]) if "settings" in state else None, self.settings)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        for b, sd in zip(self.terms, state.get("terms") or []):
            b.module.load_state_dict(sd)
        _set_rng_state(state["rng"], self.train_loader)
        history = json.loads(state["history"])
        self._write_log(history)  # a kill between checkpoint and log left the log one epoch short
        return history, state["epoch"], state["elapsed"]

    # -- the loop -----------------------------------------------------------------------------
    def _epoch(self, net: nn.Module, epoch: int) -> dict:
        """One epoch of training; its log row. Reads nothing back to the host until its end (see
        :mod:`kd2m.step`): a non-finite step zeroes its gradients (the weights stay finite) and is
        reported once the epoch is over, naming the first such step, on every rank alike."""
        cfg, device = self.cfg, self.device
        amp = amp_dtype(cfg.amp)
        lam = [b.config.weight_at(epoch, self.epochs) * scale for b, scale in zip(self.terms, self.scales)]
        net.train()
        tally = EpochTally(len(self.terms), device)
        params = [p for group in self.opt.param_groups for p in group["params"]]
        with value_checks.deferred():
            for step, (x, y, key) in enumerate(self.train_loader):
                x, y = to_device(x, device, cfg.channels_last), y.to(device, non_blocking=True)
                key = key.to(device, non_blocking=True)
                out = forward_terms(net, self.terms, self.teacher_out, self.s_taps, x, y, key, self.views,
                                    device, amp)
                distill = out.ce.new_zeros(())
                for v, w in zip(out.values, lam):
                    distill = distill + w * v.float()
                loss = self.method.ce_weight * out.ce + distill
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                for b in self.terms:  # term parameters live outside DDP: average their gradients as DDP does
                    if any(True for _ in b.module.parameters()):
                        dist_ctx.average_gradients(b.module)
                grads_ok = zero_nonfinite_gradients(params)
                self.opt.step()
                tally.add(step, out, loss, distill, grads_ok)
        totals = tally.read()
        if totals["bad_steps"]:
            raise NonFiniteLossError(self._nonfinite_where(epoch, totals))
        mean = dict(zip(["loss", "ce", "distill"] + [b.key for b in self.terms], totals["means"]))
        row = {k: mean[k] for k in ("loss", "ce", "distill")}
        if self.terms:
            row["terms"] = {b.key: mean[b.key] for b in self.terms}
            row["weights"] = {b.key: w for b, w in zip(self.terms, lam)}
        return row

    def _nonfinite_where(self, epoch: int, totals: dict) -> str:
        """Where an epoch went non-finite: its first bad step, and what was non-finite there."""
        at = f"at epoch {epoch + 1}, step {totals['first_bad'] + 1}"
        if not totals["first_is_local"]:
            return f"non-finite loss {at} (on another rank)"
        if totals["first_student_nonfinite"]:
            return f"non-finite student features {at}"
        if totals["first_teacher_nonfinite"]:
            return f"non-finite teacher features {at}"
        ce, *values = totals["first_values"]
        parts = ", ".join([f"ce={ce:.4g}"] + [f"{b.key}={v:.4g}" for b, v in zip(self.terms, values)])
        return f"non-finite loss {at} ({parts})"

    def _write_log(self, history: list) -> None:
        if dist_ctx.is_main():
            # not fsync'ed: the checkpoint (durable) holds the same history, and a resume rewrites the log from it
            atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in history), durable=False)

    def _finished(self, load_finished: bool) -> dict:
        result = read_json(self.final_path, f"delete {self.run_dir} to redo that run")
        if not isinstance(result, dict) or "test_acc" not in result:
            raise ConfigError(f"{self.final_path} is not a kd2m result (expected a JSON object with test_acc); "
                              "delete that run directory to redo it")
        check_settings(self.run_dir, result.get("settings"), self.settings)
        weights = self.run_dir / MODEL_PT
        if load_finished:
            if not weights.exists():
                raise ConfigError(f"{self.final_path} marks this run finished but {weights} is missing; "
                                  f"delete {self.run_dir} to retrain it")
            self.model.load_state_dict(load_checkpoint(weights))
        if dist_ctx.is_main():  # a kill after final.json left the resume state behind: drop it now
            _remove(self.ckpt_path)
        self.model.to(self.device)
        return result

    def _diverged(self, where: str) -> NonFiniteLossError:
        if self.ckpt_path.exists():
            # a lower λ or lr changes the run's settings, which a resume refuses: say so
            # the fix first, one path: the error line is capped at 300 characters and run paths can be long
            advice = (f"to lower --weight or --lr, delete {self.run_dir} first; else the same command resumes from "
                      "its last good checkpoint, kept there")
        else:
            advice = "no checkpoint was written yet: lower --lr or --weight and rerun"
        return NonFiniteLossError(f"{self.desc or self.run_dir}: {where}; {advice}", where)

    def fit(self, load_finished: bool = True) -> dict:
        if self.final_path.exists():  # finished earlier: its result (and, for a teacher, its weights)
            result = self._finished(load_finished)
            watch.backfill_tensorboard(self.cfg, self.run_dir, self._title(), self.settings)
            return result
        if dist_ctx.is_main():  # an earlier divergence is retried (its cause may be gone), and recorded anew
            _remove(self.diverged_path)
        self._setup()
        history, start, elapsed = self._resume()
        # kd2m.monitor: diagnostics into each row, TensorBoard; None when neither is wanted
        self.monitor = watch.Monitor.for_run(self.cfg, "teacher" if self.method.is_teacher else "student",
                                             self.run_dir, self._title(), self.settings, history,
                                             self.reference_teacher, self.bundle.test, self.device)
        cfg = self.cfg
        net = self.model
        if dist_ctx.is_distributed():
            net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            # Dynamo does not guard on module hooks by default: without a reset, a graph compiled
            # for an earlier run's un-hooked student (same class, same code) is reused and this
            # run's FeatureTap never fires.
            torch._dynamo.reset()
            net = torch.compile(net)
        bar = progress(range(start, self.epochs), self.desc, total=self.epochs, initial=start,
                       enabled=cfg.progress and dist_ctx.is_main())
        try:
            for epoch in bar:
                t0 = time.perf_counter()
                if hasattr(self.train_loader.sampler, "set_epoch"):
                    self.train_loader.sampler.set_epoch(epoch)
                lr = self.opt.param_groups[0]["lr"]  # the rate this epoch trains with
                sums = self._epoch(net, epoch)
                self.sched.step()
                acc = evaluate(net, self.test_loader, self.device, cfg.channels_last)
                elapsed += time.perf_counter() - t0
                history.append({"epoch": epoch + 1, "test_acc": acc, "lr": lr, "seconds": elapsed, **sums})
                if self.monitor is not None:  # kd2m.monitor: adds row["diag"] (before the checkpoint), TensorBoard
                    self.monitor.epoch_end(self.model, history[-1])
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(acc=f"{acc:.4f}", loss=f"{sums['loss']:.3f}")
                if dist_ctx.is_main():
                    save_checkpoint(self.ckpt_path, {
                        "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                        "scheduler": self.sched.state_dict(), "terms": [b.module.state_dict() for b in self.terms],
                        "rng": _rng_state(self.train_loader), "epoch": epoch + 1, "elapsed": elapsed,
                        "settings": json.dumps(self.settings), "history": json.dumps(history)})
                    self._write_log(history)
        except NonFiniteLossError as e:  # say which run diverged and how to go on
            if dist_ctx.is_main():  # recorded: the same settings diverge the same way (training is deterministic)
                atomic_write_json(self.diverged_path, {"where": e.where, "settings": self.settings})
            raise self._diverged(e.where) from None
        finally:
            self.remove_hooks()
            if self.monitor is not None:
                self.monitor.close()
        return self._finish(net, history, elapsed)

    def remove_hooks(self) -> None:
        """Take the feature taps off the student and the teacher (after training, or after a
        :meth:`_setup` that only calibrated)."""
        for hooks in (getattr(self, "s_taps", None), getattr(self, "teacher_out", None)):
            if hooks is not None:
                hooks.remove()

    def _title(self) -> str:
        return f"{self.method.label} ({self.method.key}), seed {self.seed}"

    def _finish(self, net, history: list, elapsed: float) -> dict:
        if history:
            last = history[-1]["test_acc"]
            best = max(history, key=lambda r: r["test_acc"])
        else:
            last = evaluate(net, self.test_loader, self.device)
            best = {"test_acc": last, "epoch": 0}
        m = self.method
        result = {"method": m.key, "metric": "+".join(t.name for t in m.terms) or None,
                  "weight": m.terms[0].weight if len(m.terms) == 1 else None, "seed": self.seed,
                  "test_acc": last, "best_acc": best["test_acc"], "best_epoch": best["epoch"],
                  "epochs": self.epochs, "seconds": round(elapsed, 3), "settings": self.settings}
        if any(b.config.auto for b in self.terms):
            result["auto_scales"] = {b.key: s for b, s in zip(self.terms, self.scales)}
        if dist_ctx.is_main():
            self._write_log(history)
            save_checkpoint(self.run_dir / MODEL_PT, self.model.state_dict())
            atomic_write_json(self.final_path, result)
            _remove(self.ckpt_path)  # the resume state is no longer needed once the final weights are written
        dist_ctx.barrier()  # no rank starts the next run before rank 0 has written this one
        return result


def _remove(path: Path) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def fit(model: nn.Module, bundle, cfg: RunConfig, method: Method, seed: int, run_dir: Path,
        device: torch.device, teacher: nn.Module | None = None, epochs: int | None = None,
        desc: str = "", load_finished: bool = True, teacher_caches: dict | None = None) -> dict:
    """Train ``model`` for ``epochs`` with ``method``'s loss; resume from ``run_dir`` if a checkpoint is there.

    Writes ``run_dir/checkpoint.pt`` (every epoch, atomically), ``run_dir/log.jsonl`` (one line per
    epoch: test accuracy, the lr it trained with, loss = w_CE·ce + distill, each term's unweighted value
    under ``terms`` and its λ under ``weights``; a student's feature gap to its teacher under ``diag``,
    see :mod:`kd2m.monitor`), ``run_dir/model.pt`` (final weights) and
    ``run_dir/final.json`` (the result: last- and best-epoch accuracy; its presence marks the run
    finished). Returns the result dict.

    A finished run is not retrained: its result is returned, and its weights are loaded into
    ``model`` when ``load_finished`` (a teacher that students need; a missing ``model.pt`` is then
    an error, never a random teacher). With ``cfg.teacher_cache`` = K > 0 the teacher's outputs
    come from a :class:`~kd2m.teacher_cache.TeacherCache`; ``teacher_caches`` (a dict) lets
    several runs of one teacher share it.
    """
    return Trainer(model, bundle, cfg, method, seed, run_dir, device, teacher, epochs, desc,
                   teacher_caches).fit(load_finished)
