"""Two gloo ranks, one going non-finite: every rank stops alike and the diverging rank is recorded."""
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kd2m.harness.config import RunConfig


def _one_rank_nan_worker(rank, init_file, out_dir):
    """Two gloo ranks train a CE-only digits student; CE goes NaN on rank 1 only, at step 3."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from kd2m import tasks
    from kd2m.data import build_dataset
    from kd2m.errors import NonFiniteLossError
    from kd2m.harness.trainer import Trainer
    from kd2m.training.build import build_student
    from kd2m.training.methods import Method
    real, calls = tasks.Classification.supervised_loss, []

    def poisoned(self, logits, targets):
        calls.append(1)
        value = real(self, logits, targets)
        return value * float("nan") if rank == 1 and len(calls) == 3 else value
    tasks.Classification.supervised_loss = poisoned
    torch.set_num_threads(1)
    try:
        cfg = RunConfig(epochs=2, progress=False, diagnostics=False, metrics=[], baselines=["ce"],
                        out=out_dir).resolved()
        bundle = build_dataset("digits")
        tr = Trainer(build_student(cfg, bundle, 0), bundle, cfg, Method("ce"), 0,
                     os.path.join(out_dir, "ce", "seed0"), torch.device("cpu"))
        try:
            tr.fit()
            message = "finished"
        except NonFiniteLossError as e:
            message = str(e)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_stops_every_rank_alike(tmp_path):
    """Rank 1 raised before backward() while rank 0 waited in DDP's all-reduce forever."""
    ctx = mp.start_processes(_one_rank_nan_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank hung")
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert all("non-finite loss at epoch 1, step 3" in m for m in messages), messages
    assert not (tmp_path / "ce/seed0/final.json").exists()


def _one_rank_nan_where_worker(rank, init_file, out_dir):
    """Two gloo ranks train a CE-only digits student; CE goes NaN on rank 1 only, at step 2."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from kd2m import tasks
    from kd2m.data import build_dataset
    from kd2m.errors import NonFiniteLossError
    from kd2m.harness.config import RunConfig
    from kd2m.harness.trainer import Trainer
    from kd2m.training.build import build_student
    from kd2m.training.methods import Method
    real, calls = tasks.Classification.supervised_loss, []

    def poisoned(self, logits, targets):
        calls.append(1)
        value = real(self, logits, targets)
        return value * float("nan") if rank == 1 and len(calls) == 2 else value
    tasks.Classification.supervised_loss = poisoned
    torch.set_num_threads(1)
    try:
        cfg = RunConfig(epochs=1, progress=False, diagnostics=False, metrics=[], baselines=["ce"],
                        out=out_dir).resolved()
        tr = Trainer(build_student(cfg, build_dataset("digits"), 0), build_dataset("digits"), cfg, Method("ce"), 0,
                     os.path.join(out_dir, "ce", "seed0"), torch.device("cpu"))
        try:
            tr.fit()
            message = "finished"
        except NonFiniteLossError as e:
            message = e.where
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


def test_under_torchrun_a_rank_whose_loss_was_finite_records_the_rank_that_diverged(tmp_path):
    """Rank 1's loss is NaN; DDP's all-reduce carries it into rank 0's gradients at the same step,
    and rank 0 wrote its own finite values to diverged.json as if its loss had been non-finite."""
    ctx = mp.start_processes(_one_rank_nan_where_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank hung")
    rank0, rank1 = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert rank0 == "non-finite loss at epoch 1, step 2 (on rank 1)"
    assert rank1.startswith("non-finite loss at epoch 1, step 2 (ce=nan")
    recorded = json.loads((tmp_path / "ce/seed0/diverged.json").read_text())["where"]   # written by rank 0
    assert recorded == rank0
