"""What decides a run and what a resume restores: its settings (stored with it, so a resume or a
skip never silently reuses a run made with other settings), the learning-rate schedule, and the
RNG states a checkpoint carries."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from .. import distributed as dist_ctx
from ..errors import ConfigError
from ..models.pretrained import weights_identity

__all__ = ["run_settings", "check_settings", "make_optimizer", "make_scheduler", "rng_state", "set_rng_state"]


def run_settings(cfg, method, seed: int, epochs: int, teacher=None, threads: int | None = None) -> dict:
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
    if teacher is not None and method.uses_teacher:  # the keys of catalog.TEACHER_SETTINGS
        s.update(teacher=cfg.teacher, teacher_options=cfg.teacher_options, teacher_epochs=cfg.teacher_epochs,
                 pretrained_teacher=_weights_id(cfg.pretrained_teacher), teacher_lr=cfg.teacher_lr,
                 match=cfg.match, terms=[t.describe() for t in method.terms])
        if cfg.teacher_cache:
            s.update(teacher_cache=cfg.teacher_cache)  # K fixed views: other augmentations than online
            if getattr(cfg, "teacher_topk", None):  # only when set: dense-cache runs keep their settings
                s.update(teacher_topk=cfg.teacher_topk)
    elif method.terms:
        s.update(terms=[t.describe() for t in method.terms])
    if method.ce_weight != 1.0:  # only when set: runs made before CE had a weight keep their settings
        s.update(ce_weight=method.ce_weight)
    if threads is not None and threads != 1:  # one thread (the digits' and MNIST-1D's default) as before
        s.update(threads=threads)
    # only where not the default: runs made before these existed keep their settings
    if getattr(cfg, "optimizer", "sgd") not in (None, "sgd"):
        s.update(optimizer=cfg.optimizer)
    if getattr(cfg, "auto_every", 0) and any(t.auto for t in method.terms):
        s.update(auto_every=cfg.auto_every)
    if getattr(cfg, "holdout", 0):  # trained on part of the training split, scored on the rest
        s.update(holdout=cfg.holdout)
    if getattr(cfg, "tokenizer", None):
        s.update(tokenizer=_weights_id(cfg.tokenizer))
    if str(cfg.dataset).startswith("text:"):  # the text's content, not its name: edited text is other settings
        from ..data.text import text_identity
        s.update(text=text_identity(cfg.dataset[len("text:"):]))
    return json.loads(json.dumps(s))  # the form it has once read back from disk (tuples -> lists)


def _weights_id(path):
    """A weights file as the settings hold it: its content's digest, not its name."""
    return weights_identity(path) if path else None


def check_settings(run_dir: Path, stored: dict | None, current: dict) -> None:
    """ConfigError when a run directory holds a run made with other settings than ``current``."""
    if stored is None:
        return
    diff = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    if diff:
        what = "; ".join(_difference(k, stored.get(k), current.get(k)) for k in diff[:4])
        raise ConfigError(f"{run_dir} holds a run made with other settings ({what}); "
                          "use another --out, or delete that directory to redo it")


def _difference(path: str, there, now) -> str:
    """'path there-value there, now-value now' at the first place two settings differ, descending
    into mappings and equal-length lists (``terms[0].weight 0.3 there, 1.0 now``): a whole term's
    description cut to a few characters hides the field that differs."""
    while True:
        if isinstance(there, dict) and isinstance(now, dict):
            key = next(k for k in sorted(set(there) | set(now), key=str) if there.get(k) != now.get(k))
            path, there, now = f"{path}.{key}", there.get(key), now.get(key)
        elif isinstance(there, list) and isinstance(now, list) and len(there) == len(now):
            i = next(i for i, (a, b) in enumerate(zip(there, now)) if a != b)
            path, there, now = f"{path}[{i}]", there[i], now[i]
        else:
            return f"{path} {there!r:.60} there, {now!r:.60} now"


def make_optimizer(params, cfg):
    """The run's optimizer over ``params``: SGD with momentum (the CIFAR protocol, the default) or
    AdamW (language models), each with ``cfg.weight_decay``."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(opt, cfg, epochs: int):
    """The run's learning-rate schedule, stepped once per epoch (identical for every method of a grid):
    cosine from lr to lr_min over all epochs, or ×lr_gamma at each of lr_milestones (the CRD protocol)."""
    if cfg.lr_schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.lr_milestones), gamma=cfg.lr_gamma)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=min(cfg.lr_min, cfg.lr))


def rng_state(loader) -> dict:
    """Python's, NumPy's, torch's and the loader's RNG states, as a checkpoint stores them."""
    # numpy's state as a tensor: weights_only loading accepts tensors, not numpy arrays
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "numpy_pos": int(np.random.get_state()[2]), "python": json.dumps(random.getstate()),
            "loader": loader.generator.get_state() if loader.generator is not None else None}


def set_rng_state(state: dict, loader) -> None:
    """Restore what :func:`rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("loader") is not None and loader.generator is not None:
        loader.generator.set_state(state["loader"])
