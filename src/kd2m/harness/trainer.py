"""The engine: one training loop for teachers, CE-only students and distilled students.

A run optimises ``w_CE · supervised + Σ_k λ_k(epoch) · term_k`` (:class:`~kd2m.training.methods.Method`,
terms from the one registry :mod:`kd2m.losses`, the supervised loss and the held-out figures
from the run's task, :mod:`kd2m.tasks`). Every student of a seed shares the same initial
weights, data order, optimizer and schedule; only the terms differ. Each epoch ends with an
atomic checkpoint; a killed run resumes from the last one and, on CPU with deterministic
algorithms, finishes bit-identical to an uninterrupted run.

:meth:`Trainer.fit` reads set-up → resume → loop → finish; the pieces it puts together live in
:mod:`kd2m.training` (networks and loaders, term binding, the teacher's outputs, run state, the
one step). :func:`fit` trains (or resumes) one run and returns its result.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from .. import distributed as dist_ctx
from .. import tasks, value_checks
from ..atomic_io import atomic_write_json, atomic_write_text, load_checkpoint, read_json, save_checkpoint
from ..data import dataset_labels
from ..errors import ConfigError, NonFiniteLossError
from ..runtime import amp_dtype, fork_rng, progress, seed_everything, to_device
from ..training.auto_weight import calibrate
from ..training.binding import bind_terms, wanted_layers
from ..training.build import make_loaders
from ..training.distiller import Distiller
from ..training.methods import Method
from ..training.state import check_settings, make_optimizer, make_scheduler, rng_state, run_settings, set_rng_state
from ..training.step import EpochTally, TermFailure, zero_nonfinite_gradients
from ..training.teacher import CachedTeacher, OnlineTeacher, cached_layer, sparse_temperature, teacher_cache
from ..training.teacher_cache import FixedViews
from . import monitor as watch
from .divergence import diverged_error, nonfinite_where, term_failure
from .rundir import CHECKPOINT_PT, DIVERGED_JSON, FINAL_JSON, LOG_JSONL, MODEL_PT

__all__ = ["Trainer", "fit", "evaluate"]


def evaluate(model: nn.Module, loader, device, channels_last: bool = False) -> float:
    """Test accuracy of a classifier over ``loader`` (:meth:`kd2m.tasks.Classification.evaluate`)."""
    return tasks.get("classification").evaluate(model, loader, device, channels_last)["test_acc"]


class Trainer:
    """One run's state: the model, its terms, optimizer, schedule, loaders and the teacher's outputs.

    ``Trainer(...).fit()`` trains (or resumes) and returns the result; see :func:`fit`.
    """

    def __init__(self, model: nn.Module, bundle, cfg, method: Method, seed: int, run_dir: Path,
                 device: torch.device, teacher: nn.Module | None = None, epochs: int | None = None,
                 desc: str = "", teacher_caches: dict | None = None):
        self.model, self.bundle, self.cfg, self.method, self.seed = model, bundle, cfg, method, seed
        self.run_dir, self.device, self.desc = Path(run_dir), device, desc
        self.task = tasks.get(getattr(bundle, "task", "classification"))
        self.teacher = teacher if method.uses_teacher else None
        self.reference_teacher = teacher  # what kd2m.harness.monitor compares every student with (CE-only included)
        self.epochs = cfg.epochs if epochs is None else epochs
        self.teacher_caches = teacher_caches
        self.settings = run_settings(cfg, method, seed, self.epochs, self.teacher,
                                     threads=torch.get_num_threads() if device.type == "cpu" else None)
        self.final_path = self.run_dir / FINAL_JSON
        self.diverged_path = self.run_dir / DIVERGED_JSON
        self.ckpt_path = self.run_dir / CHECKPOINT_PT
        self.log_path = self.run_dir / LOG_JSONL
        self.s_taps = self.teacher_out = self.monitor = None

    # -- set-up --------------------------------------------------------------------------------
    def _setup(self) -> None:
        """Terms bound to their layers, loaders, the teacher's outputs, optimizer, schedule, the
        step, and the λ scales of ``weight: auto`` terms."""
        cfg, device, model = self.cfg, self.device, self.model
        seed_everything(self.seed + 1000 * dist_ctx.rank())  # augmentation differs per rank; DDP syncs weights
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        example = self.bundle.train[0][0].unsqueeze(0).repeat(2, *([1] * self.bundle.train[0][0].dim()))
        example = to_device(example, device, cfg.channels_last)
        # The terms' own parameters (a projector to the teacher's width) are drawn from the seed
        # alone, aside from the run's stream: every rank starts from the same projector (its
        # gradients are averaged, so it must start equal to stay equal), and the student draws
        # the same dropout masks as the CE-only student of its seed, a term at weight 0 leaving it
        # that student exactly.
        with fork_rng():  # the CPU generator, where modules are initialised; a CUDA stream is left alone
            torch.default_generator.manual_seed(self.seed)
            self.terms = bind_terms(self.method, model, self.teacher, example, self.bundle.num_classes,
                                    len(self.bundle.train), cfg.match, dataset_labels(self.bundle.train))
        for b in self.terms:
            b.module.to(device)
        self.views = 1
        if self.teacher is not None and cfg.teacher_cache:
            layer, raw = cached_layer(cfg, self.method, self.terms)
            views = FixedViews(self.bundle.train, cfg.teacher_cache, self.seed)
            cache = teacher_cache(self.teacher, views, layer, cfg, device, self.teacher_caches, raw,
                                  sparse_temperature(self.method))
            self.train_loader, self.test_loader = make_loaders(self.bundle, cfg, self.seed, device, views=views)
            self.teacher_out = CachedTeacher(cache, layer, raw)
            self.views = cfg.teacher_cache
        else:
            self.train_loader, self.test_loader = make_loaders(self.bundle, cfg, self.seed, device)
            self.teacher_out = OnlineTeacher(self.teacher, wanted_layers(self.terms, "teacher")) \
                if self.teacher is not None else None
        params = list(model.parameters()) + [p for b in self.terms for p in b.module.parameters()]
        # the optimiser's parameters by name, in its order: a non-finite gradient is named by them
        self.param_names = [n for n, _ in model.named_parameters()] + \
            [f"{b.key}.{n}" for b in self.terms for n, _ in b.module.named_parameters()]
        self.opt = make_optimizer(params, cfg)
        self.sched = make_scheduler(self.opt, cfg, self.epochs)
        # the step is the front door's (kd2m.Distiller): a user's loop and this engine compute one loss
        self.distiller = Distiller.from_bound(model, self.teacher, self.method, self.terms, self.task, device,
                                              teacher_out=self.teacher_out, views=self.views, amp=amp_dtype(cfg.amp))
        self.s_taps, self.step = self.distiller.s_taps, self.distiller.step
        self.scales = self._calibrate()

    @property
    def scales(self) -> list[float]:
        """The λ scale of each term (1 unless ``auto``), as the distiller applies it."""
        return self.distiller.scales

    @scales.setter
    def scales(self, value: list[float]) -> None:
        self.distiller.scales, self.distiller.calibrated = list(value), True

    def _calibrate(self) -> list[float]:
        """The λ scale of each term (:func:`kd2m.training.auto_weight.calibrate`) on the student as it is now."""
        cfg = self.cfg
        return calibrate(self.step, self.bundle.train, cfg.batch_size, self.method.key, cfg.channels_last)

    # -- resume --------------------------------------------------------------------------------
    def _resume(self) -> tuple[list, int, float]:
        """(history, first epoch to train, seconds so far) from the last checkpoint, if any."""
        if not self.ckpt_path.exists():
            return [], 0, 0.0
        state = load_checkpoint(self.ckpt_path)
        check_settings(self.run_dir, json.loads(state["settings"]) if "settings" in state else None, self.settings)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        for b, sd in zip(self.terms, state.get("terms") or []):
            b.module.load_state_dict(sd)
        set_rng_state(state["rng"], self.train_loader)
        if "auto_scales" in state:  # recalibrated during the run (auto_every): the λ it last had
            self.scales = list(state["auto_scales"])
        history = json.loads(state["history"])
        self._write_log(history)  # a kill between checkpoint and log left the log one epoch short
        return history, state["epoch"], state["elapsed"]

    # -- the loop ------------------------------------------------------------------------------
    def _network(self) -> nn.Module:
        """The model as the loop runs it: under DDP when distributed, compiled on request."""
        net = self.model
        if dist_ctx.is_distributed():
            net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            # Dynamo does not guard on module hooks by default: without a reset, a graph compiled
            # for an earlier run's un-hooked student (same class, same code) is reused and this
            # run's FeatureTap never fires.
            torch._dynamo.reset()
            net = torch.compile(net)
        return net

    def _loop(self, net: nn.Module, history: list, start: int, elapsed: float) -> float:
        """Train epochs ``start`` … ``epochs``−1: each one trains, steps the schedule, evaluates,
        monitors and checkpoints. Returns the seconds spent training in all sessions."""
        bar = progress(range(start, self.epochs), self.desc, total=self.epochs, initial=start,
                       enabled=self.cfg.progress and dist_ctx.is_main())
        for epoch in bar:
            t0 = time.perf_counter()
            if hasattr(self.train_loader.sampler, "set_epoch"):
                self.train_loader.sampler.set_epoch(epoch)
            lr = self.opt.param_groups[0]["lr"]  # the rate this epoch trains with
            sums = self._epoch(net, epoch)
            self.sched.step()
            figures = self._evaluate(net)
            elapsed += time.perf_counter() - t0
            history.append({"epoch": epoch + 1, **figures, "lr": lr, "seconds": elapsed, **sums})
            if self.monitor is not None:  # kd2m.harness.monitor: adds row["diag"] (before the checkpoint), TensorBoard
                self.monitor.epoch_end(self.model, history[-1])
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(score=self.task.describe(figures), loss=f"{sums['loss']:.3f}")
            if dist_ctx.is_main():
                self._checkpoint(history, epoch, elapsed)
        return elapsed

    def _epoch(self, net: nn.Module, epoch: int) -> dict:
        """One epoch of training; its log row. Reads nothing back to the host until its end (see
        :mod:`kd2m.training.step`): a non-finite step zeroes its gradients (the weights stay finite)
        and is reported once the epoch is over, naming the first such step, on every rank alike."""
        cfg, device = self.cfg, self.device
        every = cfg.auto_every
        if every and epoch > 0 and epoch % every == 0:  # λ of `auto` terms recalibrated on the student as it is now
            try:
                self.scales = self._calibrate()
            except ConfigError as e:
                # at initialisation a flat term is the user's to fix; here it is what training did to
                # the student (features collapsed under the term's pull): this run diverged, the grid goes on
                raise NonFiniteLossError(f"recalibrating λ at epoch {epoch + 1}: {e}") from None
        self.distiller.set_epoch(epoch, self.epochs)
        lam = self.distiller.weights()
        net.train()
        tally = EpochTally(len(self.terms), device)
        params = [p for group in self.opt.param_groups for p in group["params"]]
        with value_checks.deferred():
            for step, (x, y, key) in enumerate(self.train_loader):
                x, y = to_device(x, device, cfg.channels_last), y.to(device, non_blocking=True)
                key = key.to(device, non_blocking=True)
                try:
                    out = self.step.forward(x, y, key, net=net, lam=lam)
                except TermFailure as f:
                    raise term_failure(f, epoch, step, self.s_taps) from None
                loss, distill = self.step.loss(out, lam)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                for b in self.terms:  # term parameters live outside DDP: average their gradients as DDP does
                    if any(True for _ in b.module.parameters()):
                        dist_ctx.average_gradients(b.module)
                grads_finite = zero_nonfinite_gradients(params)
                self.opt.step()
                tally.add(step, out, loss, distill, grads_finite)
        totals = tally.read()
        if totals["bad_steps"]:
            raise NonFiniteLossError(nonfinite_where(epoch, totals, self.terms, self.param_names))
        mean = dict(zip(["loss", "ce", "distill"] + [b.key for b in self.terms], totals["means"]))
        row = {k: mean[k] for k in ("loss", "ce", "distill")}
        if self.terms:
            row["terms"] = {b.key: mean[b.key] for b in self.terms}
            row["weights"] = {b.key: w for b, w in zip(self.terms, lam)}
        return row

    def _evaluate(self, net: nn.Module) -> dict:
        """The task's held-out figures of ``net`` (e.g. ``{"test_acc": …}``)."""
        return self.task.evaluate(net, self.test_loader, self.device, self.cfg.channels_last)

    def _checkpoint(self, history: list, epoch: int, elapsed: float) -> None:
        save_checkpoint(self.ckpt_path, {
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "terms": [b.module.state_dict() for b in self.terms],
            "rng": rng_state(self.train_loader), "epoch": epoch + 1, "elapsed": elapsed, "auto_scales": self.scales,
            "settings": json.dumps(self.settings), "history": json.dumps(history)})
        self._write_log(history)

    def _write_log(self, history: list) -> None:
        if dist_ctx.is_main():
            # not fsync'ed: the checkpoint (durable) holds the same history, and a resume rewrites the log from it
            atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in history), durable=False)

    # -- finish --------------------------------------------------------------------------------
    def fit(self, load_finished: bool = True) -> dict:
        """Set-up → resume → loop → finish; a finished run returns its result at once."""
        if self.final_path.exists():  # finished earlier: its result (and, for a teacher, its weights)
            result = self._finished(load_finished)
            watch.backfill_tensorboard(self.cfg, self.run_dir, self._title(), self.settings)
            return result
        if dist_ctx.is_main():  # an earlier divergence is retried (its cause may be gone), and recorded anew
            _remove(self.diverged_path)
        try:
            self._setup()
            history, start, elapsed = self._resume()
            # kd2m.harness.monitor: diagnostics into each row, TensorBoard; None when neither is wanted
            self.monitor = watch.Monitor.for_run(self.cfg, "teacher" if self.method.is_teacher else "student",
                                                 self.run_dir, self._title(), self.settings, history,
                                                 self.reference_teacher, self.bundle.test, self.device, self.task)
            net = self._network()
            elapsed = self._loop(net, history, start, elapsed)
        except NonFiniteLossError as e:  # say which run diverged and how to go on
            if dist_ctx.is_main():  # recorded: the same settings diverge the same way (training is deterministic)
                atomic_write_json(self.diverged_path, {"where": e.where, "settings": self.settings})
            raise diverged_error(self.desc or self.run_dir, self.run_dir, self.ckpt_path, e.where) from None
        finally:
            self.remove_hooks()
            if self.monitor is not None:
                self.monitor.close()
        return self._finish(net, history, elapsed)

    def remove_hooks(self) -> None:
        """Take the feature taps off the student and the teacher (after training, or after a
        :meth:`_setup` that only calibrated)."""
        for hooks in (self.s_taps, self.teacher_out):
            if hooks is not None:
                hooks.remove()

    def _finished(self, load_finished: bool) -> dict:
        result = read_json(self.final_path, f"delete {self.run_dir} to redo that run")
        if not isinstance(result, dict) or self.task.primary not in result:
            raise ConfigError(f"{self.final_path} is not a kd2m result (expected a JSON object with "
                              f"{self.task.primary}); delete that run directory to redo it")
        check_settings(self.run_dir, result.get("settings"), self.settings)
        weights = self.run_dir / MODEL_PT
        if load_finished and weights.exists():
            self.model.load_state_dict(load_checkpoint(weights))
        elif load_finished and not isinstance(result.get("weights"), dict):
            raise ConfigError(f"{self.final_path} marks this run finished but {weights} is missing; "
                              f"delete {self.run_dir} to retrain it")
        # else a pretrained teacher no epoch trained: the model was built from the file its final.json
        # references, whose content the settings just checked (their pretrained digest)
        if dist_ctx.is_main():  # a kill after final.json left the resume state behind: drop it now
            _remove(self.ckpt_path)
        self.model.to(self.device)
        return result

    def _title(self) -> str:
        return f"{self.method.label} ({self.method.key}), seed {self.seed}"

    def _finish(self, net, history: list, elapsed: float) -> dict:
        """The run's result (``final.json``: the last epoch's figures, the best epoch's primary
        figure, the settings), its weights and log, written atomically; the checkpoint removed."""
        task = self.task
        if history:
            last = {k: history[-1][k] for k in history[-1] if k.startswith("test_")}
            best = history[0]
            for row in history[1:]:
                if task.better(row[task.primary], best[task.primary]):
                    best = row
        else:
            last = self._evaluate(net)
            best = {**last, "epoch": 0}
        m = self.method
        result = {"method": m.key, "metric": "+".join(t.name for t in m.terms) or None,
                  "weight": m.terms[0].weight if len(m.terms) == 1 else None, "seed": self.seed,
                  **last, task.best_key: best[task.primary], "best_epoch": best["epoch"],
                  "epochs": self.epochs, "seconds": round(elapsed, 3), "settings": self.settings}
        if any(b.config.auto for b in self.terms):
            result["auto_scales"] = {b.key: s for b, s in zip(self.terms, self.scales)}
        reference = self._pretrained_reference()
        if reference is not None:
            result["weights"] = reference
        if dist_ctx.is_main():
            self._write_log(history)
            if reference is None:
                save_checkpoint(self.run_dir / MODEL_PT, self.model.state_dict())
            atomic_write_json(self.final_path, result)
            _remove(self.ckpt_path)  # the resume state is no longer needed once the final weights are written
        dist_ctx.barrier()  # no rank starts the next run before rank 0 has written this one
        return result


    def _pretrained_reference(self) -> dict | None:
        """For a teacher no epoch trains from its ``pretrained_teacher`` file: that file by its
        absolute path and content digest (:func:`kd2m.models.pretrained.weights_identity`), the
        dtype its model computes in and, for a GGUF file, how the file stores the weights. Its
        final.json holds this in place of a ``model.pt``: the weights are the file's, the same for
        every seed (a 135M-parameter teacher would be 538 MB written per seed). None for any
        other run."""
        path = self.cfg.pretrained_teacher
        if not (self.method.is_teacher and self.epochs == 0 and path):
            return None
        from ..models.hf import gguf_storage, is_gguf
        from ..models.pretrained import weights_identity
        dtype = next(self.model.parameters()).dtype
        reference = {"file": os.path.abspath(path), "identity": weights_identity(path),
                     "dtype": str(dtype).removeprefix("torch.")}
        if is_gguf(path):
            reference["stored_as"] = f"GGUF: {gguf_storage(path)}, dequantised"
        return reference


def _remove(path: Path) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def fit(model: nn.Module, bundle, cfg, method: Method, seed: int, run_dir: Path,
        device: torch.device, teacher: nn.Module | None = None, epochs: int | None = None,
        desc: str = "", load_finished: bool = True, teacher_caches: dict | None = None) -> dict:
    """Train ``model`` for ``epochs`` with ``method``'s loss; resume from ``run_dir`` if a checkpoint is there.

    Writes ``run_dir/checkpoint.pt`` (every epoch, atomically), ``run_dir/log.jsonl`` (one line per
    epoch: the held-out figures, the lr it trained with, loss = w_CE·ce + distill, each term's unweighted value
    under ``terms`` and its λ under ``weights``; a student's feature gap to its teacher under ``diag``,
    see :mod:`kd2m.harness.monitor`), ``run_dir/model.pt`` (final weights) and
    ``run_dir/final.json`` (the result: last- and best-epoch figures; its presence marks the run
    finished). Returns the result dict.

    A finished run is not retrained: its result is returned, and its weights are loaded into
    ``model`` when ``load_finished`` (a teacher that students need; a missing ``model.pt`` is then
    an error, never a random teacher). With ``cfg.teacher_cache`` = K > 0 the teacher's outputs
    come from a :class:`~kd2m.training.teacher_cache.TeacherCache`; ``teacher_caches`` (a dict) lets
    several runs of one teacher share it.
    """
    return Trainer(model, bundle, cfg, method, seed, run_dir, device, teacher, epochs, desc,
                   teacher_caches).fit(load_finished)
