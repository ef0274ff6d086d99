"""The engine: one training loop for teachers, CE-only students and distilled students.

Every student of a seed shares the same initial weights, data order, optimizer and schedule;
only the loss differs (CE, CE + Hinton KD, or CE + λ·D(features)). Each epoch ends with an
atomic checkpoint; a killed run resumes from the last one and, on CPU with deterministic
algorithms, finishes bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from . import distributed as D
from .checkpoint import atomic_write_json, atomic_write_text, load_checkpoint, save_checkpoint
from .config import ConfigError, RunConfig
from .features import FeatureTap
from .loss import KD2MLoss, hinton_kd
from .metrics._base import NonFiniteInputError
from .models import build_model, load_pretrained
from .runtime import amp_dtype, autocast, progress, to_device
from .teacher_cache import FixedViews, ViewSampler, build_teacher_cache


class NonFiniteLossError(RuntimeError):
    """The training loss (or the matched features) became NaN/inf; the last good checkpoint is kept."""


@dataclass(frozen=True)
class Method:
    """What a run optimises. ``key`` names its directory and its results rows."""
    key: str
    metric: str | None = None      # a kd2m metric name, or None
    weight: float = 0.0            # λ
    kd_weight: float = 0.0         # Hinton KD weight (0 = off)

    @property
    def uses_teacher(self) -> bool:
        """A student whose loss needs the teacher's outputs (feature metric or Hinton KD)."""
        return bool(self.metric) or self.kd_weight > 0

    @property
    def is_teacher(self) -> bool:
        return self.key == "teacher"


def resolve_device(name: str) -> torch.device:
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
    return dev


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def make_loaders(bundle, cfg: RunConfig, seed: int, device: torch.device, views: FixedViews | None = None):
    """Train loader with a seeded shuffle (DistributedSampler under torchrun) and a test loader.

    With ``views`` (the teacher cache) the loader reads keys of those views instead of images:
    the same image order, each image in the view :class:`ViewSampler` picks for the epoch."""
    g = torch.Generator().manual_seed(seed)
    pin = device.type == "cuda"
    workers = cfg.num_workers or 0
    # Workers are not persistent: a DataLoader iterator draws its workers' base seed when it is
    # created (train: from `g`; test: from the global RNG, which also drives dropout). Created
    # every epoch, those draws are the same in a resumed run as in the uninterrupted one; a
    # persistent iterator draws once, in the first epoch a process runs, so after a resume every
    # later shuffle, crop and dropout mask would shift. Costs a worker start per epoch.
    common = dict(num_workers=workers, pin_memory=pin, persistent_workers=False)
    if D.is_distributed():
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
        train = DataLoader(bundle.train, batch_size=cfg.batch_size, sampler=sampler, generator=g, **common)
    return train, test


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, channels_last: bool = False) -> float:
    """Accuracy counted over every test sample (not a mean of per-batch accuracies).

    Under DDP the DistributedSampler pads the test set to a multiple of the world size; the
    few duplicated samples are counted, as torch's own reference scripts do.
    """
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = to_device(x, device, channels_last), y.to(device, non_blocking=True)
        correct += int((model(x).argmax(1) == y).sum())
        total += int(y.numel())
    correct, total = D.all_reduce_sum([correct, total], device)
    return correct / max(total, 1)


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
    model = build_model(getattr(cfg, role), bundle.num_classes, bundle.in_channels, bundle.image_size)
    weights = getattr(cfg, f"pretrained_{role}")
    if weights:
        load_pretrained(model, weights, new_head="fc.")
    return model


def build_student(cfg: RunConfig, bundle, seed: int) -> nn.Module:
    return build_net(cfg, bundle, seed, "student")


def build_teacher(cfg: RunConfig, bundle, seed: int) -> nn.Module:
    return build_net(cfg, bundle, seed, "teacher")


def run_settings(cfg: RunConfig, method: Method, seed: int, epochs: int, teacher=None) -> dict:
    """Everything that decides a run's result; stored with it so that a resume or a skip never
    silently reuses a run made with other settings (e.g. `kd2m run --epochs 1`, then `kd2m run`)."""
    role = "teacher" if method.is_teacher else "student"
    s = {"dataset": cfg.dataset, "model": getattr(cfg, role), "pretrained": getattr(cfg, f"pretrained_{role}"),
         "epochs": epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "lr_min": cfg.lr_min,
         "lr_schedule": cfg.lr_schedule, "lr_milestones": cfg.lr_milestones, "lr_gamma": cfg.lr_gamma,
         "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "amp": cfg.amp, "seed": seed,
         "world_size": D.world_size()}
    if teacher is not None:
        s.update(teacher=cfg.teacher, teacher_epochs=cfg.teacher_epochs, kd_weight=method.kd_weight,
                 kd_temperature=cfg.kd_temperature if method.kd_weight else None)
    if _cache_views(cfg, method, teacher):
        s.update(teacher_cache=cfg.teacher_cache)  # K fixed views: other augmentations than online
    if method.metric:
        s.update(metric=method.metric, weight=method.weight, metric_options=cfg.metric_options.get(method.metric, {}),
                 student_layer=cfg.student_layer, teacher_layer=cfg.teacher_layer, match=cfg.match)
    return json.loads(json.dumps(s))  # the form it has once read back from disk (tuples -> lists)


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
        what = "; ".join(f"{k} {stored.get(k)!r} there, {current.get(k)!r} now" for k in diff[:4])
        raise ConfigError(f"{run_dir} holds a run made with other settings ({what}); "
                          "use another --out, or delete that directory to redo it")


def fit(model: nn.Module, bundle, cfg: RunConfig, method: Method, seed: int, run_dir: Path,
        device: torch.device, teacher: nn.Module | None = None, epochs: int | None = None,
        desc: str = "", load_finished: bool = True, teacher_caches: dict | None = None) -> dict:
    """Train ``model`` for ``epochs`` with ``method``'s loss; resume from ``run_dir`` if a checkpoint is there.

    Writes ``run_dir/checkpoint.pt`` (every epoch, atomically), ``run_dir/log.jsonl`` (one line per
    epoch), ``run_dir/model.pt`` (final weights) and ``run_dir/final.json`` (the result; its presence
    marks the run finished). Returns the result dict.

    A finished run is not retrained: its result is returned, and its weights are loaded into
    ``model`` when ``load_finished`` (a teacher that students need). With ``cfg.teacher_cache``
    = K > 0 the teacher's outputs come from a :class:`~kd2m.teacher_cache.TeacherCache`;
    ``teacher_caches`` (a dict) lets several runs of one teacher share it.
    """
    run_dir = Path(run_dir)
    epochs = cfg.epochs if epochs is None else epochs
    final_path = run_dir / "final.json"
    settings = run_settings(cfg, method, seed, epochs, teacher)
    if final_path.exists():  # finished earlier: load its weights (a teacher is reused) and its result
        result = json.loads(final_path.read_text())
        check_settings(run_dir, result.get("settings"), settings)
        if load_finished and (run_dir / "model.pt").exists():
            model.load_state_dict(load_checkpoint(run_dir / "model.pt"))
        model.to(device)
        return result
    seed_everything(seed + 1000 * D.rank())  # augmentation differs per rank; DDP syncs the initial weights
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    cache = None
    if _cache_views(cfg, method, teacher):
        views = FixedViews(bundle.train, cfg.teacher_cache, seed)
        cache = _teacher_cache(teacher, views, cfg, device, teacher_caches)
        train_loader, test_loader = make_loaders(bundle, cfg, seed, device, views=views)
    else:
        train_loader, test_loader = make_loaders(bundle, cfg, seed, device)

    distill = None
    if method.metric:
        distill = KD2MLoss(method.metric, method.weight, student_dim=getattr(model, "feature_dim", None),
                           teacher_dim=getattr(teacher, "feature_dim", None), match=cfg.match,
                           **cfg.metric_options.get(method.metric, {})).to(device)
    params = list(model.parameters()) + (list(distill.parameters()) if distill is not None else [])
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = make_scheduler(opt, cfg, epochs)

    history, start, elapsed = [], 0, 0.0
    ckpt_path = run_dir / "checkpoint.pt"
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        check_settings(run_dir, json.loads(state["settings"]) if "settings" in state else None, settings)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if distill is not None and state.get("distill") is not None:
            distill.load_state_dict(state["distill"])
        _set_rng_state(state["rng"], train_loader)
        history, start, elapsed = json.loads(state["history"]), state["epoch"], state["elapsed"]

    net = model
    if D.is_distributed():
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        # Dynamo does not guard on module hooks by default: without a reset, a graph compiled
        # for an earlier run's un-hooked student (same class, same code) is reused and this
        # run's FeatureTap never fires.
        torch._dynamo.reset()
        net = torch.compile(net)
    s_tap = FeatureTap(model, cfg.student_layer) if (distill is not None) else None
    t_tap = FeatureTap(teacher, cfg.teacher_layer) if (teacher is not None and distill is not None
                                                        and cache is None) else None
    amp = amp_dtype(cfg.amp)
    bar = progress(range(start, epochs), desc, total=epochs, initial=start, enabled=cfg.progress and D.is_main())
    try:
        for epoch in bar:
            t0 = time.perf_counter()
            if hasattr(train_loader.sampler, "set_epoch"):
                train_loader.sampler.set_epoch(epoch)
            sums = _train_epoch(net, teacher, train_loader, opt, method, distill, s_tap, t_tap, cfg,
                                device, amp, epoch, cache)
            sched.step()
            acc = evaluate(net, test_loader, device, cfg.channels_last)
            elapsed += time.perf_counter() - t0
            row = {"epoch": epoch + 1, "test_acc": acc, "lr": opt.param_groups[0]["lr"], "seconds": elapsed, **sums}
            history.append(row)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(acc=f"{acc:.4f}", loss=f"{sums['loss']:.3f}")
            if D.is_main():
                save_checkpoint(ckpt_path, {
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "distill": distill.state_dict() if distill is not None else None,
                    "rng": _rng_state(train_loader), "epoch": epoch + 1, "elapsed": elapsed,
                    "settings": json.dumps(settings),
                    "history": json.dumps(history)})
                atomic_write_text(run_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    except NonFiniteLossError as e:  # say which run diverged and how to go on
        if ckpt_path.exists():
            advice = (f"the last good checkpoint {ckpt_path} is kept: lower --weight and rerun to resume from it, "
                      "or delete it and rerun with a lower --lr (a resumed run keeps its learning-rate schedule)")
        else:
            advice = "no checkpoint was written yet: lower --lr or --weight and rerun"
        raise NonFiniteLossError(f"{desc or run_dir}: {e}; {advice}") from None
    finally:
        for tap in (s_tap, t_tap):
            if tap is not None:
                tap.remove()
    result = {"method": method.key, "metric": method.metric, "weight": method.weight, "seed": seed,
              "test_acc": history[-1]["test_acc"] if history else evaluate(net, test_loader, device),
              "epochs": epochs, "seconds": round(elapsed, 3), "settings": settings}
    if D.is_main():
        save_checkpoint(run_dir / "model.pt", model.state_dict())
        atomic_write_json(final_path, result)
        try:  # the resume state is no longer needed once the final weights are written
            os.remove(ckpt_path)
        except FileNotFoundError:
            pass
    D.barrier()  # no rank starts the next run before rank 0 has written this one
    return result


def _cache_views(cfg: RunConfig, method: Method, teacher) -> int:
    """K when this run reads the teacher's outputs from a cache of K views, else 0."""
    return cfg.teacher_cache if teacher is not None and method.uses_teacher else 0


def _teacher_cache(teacher, views: FixedViews, cfg: RunConfig, device, memo: dict | None):
    key = (id(teacher), views.views, views.seed, cfg.teacher_layer, cfg.amp, cfg.channels_last)
    if memo is not None and key in memo:
        return memo[key]
    with torch.random.fork_rng(devices=[]):  # building draws no randomness the training run would see
        cache = build_teacher_cache(teacher, views, cfg.teacher_layer, device, amp_dtype=amp_dtype(cfg.amp),
                                    channels_last=cfg.channels_last, num_workers=cfg.num_workers or 0,
                                    show_progress=cfg.progress and D.is_main(), max_mb=cfg.max_cache_mb)
    if memo is not None:
        memo[key] = cache
    return cache


def _train_epoch(net, teacher, loader, opt, method: Method, distill, s_tap, t_tap, cfg, device, amp, epoch,
                 cache=None):
    net.train()
    totals = {"loss": 0.0, "ce": 0.0, "distill": 0.0, "kd": 0.0}
    seen = 0
    for step, batch in enumerate(loader):
        x, y = to_device(batch[0], device, cfg.channels_last), batch[1].to(device, non_blocking=True)
        t_feats = t_logits = None
        if cache is not None:  # (image, label, key): the teacher's outputs are looked up, not computed
            t_feats, t_logits = cache.lookup(batch[2].to(device, non_blocking=True))
        with autocast(device, amp):
            logits = net(x)
            ce = F.cross_entropy(logits.float(), y)
            loss = ce
            if cache is None and teacher is not None and method.uses_teacher:
                with torch.no_grad():
                    t_logits = teacher(x)
                if t_tap is not None:
                    t_feats = t_tap.feature
        d = kd = None
        if distill is not None:
            try:  # the metric itself refuses NaN/inf features; say where training diverged
                d = distill.distance(s_tap.feature, t_feats, y, logits, t_logits)
            except NonFiniteInputError as e:
                raise NonFiniteLossError(f"non-finite {e.who} features at epoch {epoch + 1}, step {step + 1}") from None
            loss = loss + distill.weight * d
        if method.kd_weight > 0:
            kd = hinton_kd(logits, t_logits, cfg.kd_temperature)
            loss = loss + method.kd_weight * kd
        if not torch.isfinite(loss):
            parts = f"ce={float(ce.detach()):.4g}" + (f", distill={float(d.detach()):.4g}" if d is not None else "") \
                    + (f", kd={float(kd.detach()):.4g}" if kd is not None else "")
            raise NonFiniteLossError(f"non-finite loss at epoch {epoch + 1}, step {step + 1} ({parts})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if distill is not None and distill.projector is not None:
            D.average_gradients(distill.projector)  # outside DDP: average its gradients like DDP does
        opt.step()
        n = y.shape[0]
        seen += n
        totals["loss"] += float(loss.detach()) * n
        totals["ce"] += float(ce.detach()) * n
        totals["distill"] += (float(d.detach()) if d is not None else 0.0) * n
        totals["kd"] += (float(kd.detach()) if kd is not None else 0.0) * n
    keys = list(totals)
    summed = D.all_reduce_sum([totals[k] for k in keys] + [seen], device)
    return {k: v / max(summed[-1], 1) for k, v in zip(keys, summed[:-1])}


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model

