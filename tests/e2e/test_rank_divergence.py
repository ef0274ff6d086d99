"""Two gloo ranks, one going non-finite: every rank stops alike and the diverging rank is recorded."""
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kd2m.harness.config import RunConfig


def _one_rank_nan_worker(rank, init_file, out_dir, nan_step, epochs, report):
    """Two gloo ranks train a CE-only digits student; CE goes NaN on rank 1 only, at ``nan_step``.
    Each rank writes what it ended with: "finished", or its NonFiniteLossError's ``report``
    (``"message"``: the whole text; ``"where"``: the step and rank it names)."""
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
        return value * float("nan") if rank == 1 and len(calls) == nan_step else value
    tasks.Classification.supervised_loss = poisoned
    torch.set_num_threads(1)
    try:
        cfg = RunConfig(epochs=epochs, progress=False, diagnostics=False, metrics=[], baselines=["ce"],
                        out=out_dir).resolved()
        bundle = build_dataset("digits")
        tr = Trainer(build_student(cfg, bundle, 0), bundle, cfg, Method("ce"), 0,
                     os.path.join(out_dir, "ce", "seed0"), torch.device("cpu"))
        try:
            tr.fit()
            message = "finished"
        except NonFiniteLossError as e:
            message = str(e) if report == "message" else e.where
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


def _two_ranks(tmp_path, nan_step, epochs, report) -> list[str]:
    """Run the worker on two ranks (a hang fails the test after 120 s); what each rank wrote."""
    ctx = mp.start_processes(_one_rank_nan_worker, args=(str(tmp_path / "init"), str(tmp_path), nan_step, epochs,
                                                         report), nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank hung")
    return [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]


def test_a_non_finite_loss_on_one_rank_stops_every_rank_alike(tmp_path):
    """Rank 1 raised before backward() while rank 0 waited in DDP's all-reduce forever."""
    messages = _two_ranks(tmp_path, nan_step=3, epochs=2, report="message")
    assert all("non-finite loss at epoch 1, step 3" in m for m in messages), messages
    assert not (tmp_path / "ce/seed0/final.json").exists()


def test_under_torchrun_a_rank_whose_loss_was_finite_records_the_rank_that_diverged(tmp_path):
    """Rank 1's loss is NaN; DDP's all-reduce carries it into rank 0's gradients at the same step,
    and rank 0 wrote its own finite values to diverged.json as if its loss had been non-finite."""
    rank0, rank1 = _two_ranks(tmp_path, nan_step=2, epochs=1, report="where")
    assert rank0 == "non-finite loss at epoch 1, step 2 (on rank 1)"
    assert rank1.startswith("non-finite loss at epoch 1, step 2 (ce=nan")
    recorded = json.loads((tmp_path / "ce/seed0/diverged.json").read_text())["where"]   # written by rank 0
    assert recorded == rank0
