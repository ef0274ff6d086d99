"""torch.distributed on CPU with 2 gloo processes: global-batch matching gives the exact
single-process gradient, and `torchrun -m kd2m run` completes with one results file."""
import csv
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kd2m import KD2MLoss
from kd2m.distributed import gather_with_grad

WORLD = 2
METRICS = ["w2", "cw2", "gauss_w2", "gauss_kl", "mmd_rbf", "sliced_w2"]


def _data(seed=0, n=12, d=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(WORLD * n, 5, generator=g, dtype=torch.float64)
    t = torch.randn(WORLD * n, d, generator=g, dtype=torch.float64)
    y = torch.arange(WORLD * n) % 3
    return x, t, y


def _metric(name):
    return KD2MLoss(name, weight=1.0, match="global", **({"seed": 7} if name == "sliced_w2" else {}))


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        x, t, y = _data()
        n = x.shape[0] // WORLD
        sl = slice(rank * n, (rank + 1) * n)
        results = {}
        for name in METRICS:
            # a student whose features are a linear map of the input, under DDP
            torch.manual_seed(0)
            net = nn.Linear(5, 4).double()
            ddp = nn.parallel.DistributedDataParallel(net)
            feats = ddp(x[sl])
            loss = _metric(name)(feats, t[sl], y[sl])
            loss.backward()  # DDP averages parameter gradients over ranks
            results[name] = {"loss": loss.detach(), "grad": net.weight.grad.clone()}
        # gather_with_grad alone: rank r's input gradient is W × ∂L/∂(its slice) (backward sums copies)
        s = torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(rank)).requires_grad_()
        allx = gather_with_grad(s)
        (allx ** 2 * torch.arange(1, allx.shape[0] + 1, dtype=torch.float64)[:, None]).sum().backward()
        results["gather"] = {"x": allx.detach(), "grad": s.grad.clone()}
        cache = _cache()  # each rank computes half the batches; one all-reduce completes the table
        results["cache"] = {"features": cache.features, "logits": cache.logits}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _cache():
    from kd2m.models import build_model
    from kd2m.training.teacher_cache import FixedViews, build_teacher_cache
    g = torch.Generator().manual_seed(3)
    items = [(torch.randn(1, 8, 8, generator=g), i % 4) for i in range(15)]
    torch.manual_seed(1)
    teacher = build_model("digits_cnn", 4, 1, 8)
    return build_teacher_cache(teacher, FixedViews(items, 2, 0), "penultimate", torch.device("cpu"), batch_size=8)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(d / "init"), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", METRICS)
def test_ddp_gradient_equals_single_process_global_batch_gradient(ranks, name):
    x, t, y = _data()
    torch.manual_seed(0)
    net = nn.Linear(5, 4).double()
    loss = KD2MLoss(name, weight=1.0, match="local", **({"seed": 7} if name == "sliced_w2" else {}))(net(x), t, y)
    loss.backward()
    for r in range(WORLD):
        assert torch.allclose(ranks[r][name]["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
        assert torch.allclose(ranks[r][name]["grad"], net.weight.grad, rtol=1e-8, atol=1e-10), name


def test_gather_with_grad_concatenates_and_sums_gradients(ranks):
    parts = [torch.randn(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(r)) for r in range(WORLD)]
    full = torch.cat(parts)
    w = torch.arange(1, full.shape[0] + 1, dtype=torch.float64)[:, None]
    for r in range(WORLD):
        assert torch.equal(ranks[r]["gather"]["x"], full)
        # every rank's identical loss contributes: W copies of 2·w·x on this rank's slice
        assert torch.allclose(ranks[r]["gather"]["grad"], WORLD * 2 * w[r * 12:(r + 1) * 12] * parts[r])


def test_teacher_cache_built_across_ranks_equals_single_process_table(ranks):
    single = _cache()  # 30 keys in 4 batches of 8: rank 0 computes batches 0 and 2, rank 1 batches 1 and 3
    for r in range(WORLD):
        assert torch.equal(ranks[r]["cache"]["features"], single.features)
        assert torch.equal(ranks[r]["cache"]["logits"], single.logits)
    assert single.features.abs().sum(1).min() > 0  # no row left at its zero start


def test_gather_is_identity_when_not_distributed():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x


@pytest.mark.parametrize("cache", ["0", "1"])
def test_torchrun_two_processes_on_digits(tmp_path, cache):
    """...also with the teacher cache: each rank looks its own shard's keys up in its own copy."""
    out = tmp_path / "ddp_run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kd2m", "run", "--epochs", "4", "--seeds", "1", "--metrics", "cw2", "--baselines", "ce",
           "--out", str(out), "--no-progress", "--device", "cpu", "--teacher-cache", cache]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["method"] for row in rows) == ["ce", "cw2", "teacher"]  # one row each: rank 0 writes
    assert all(0.3 < float(row["test_acc"]) <= 1.0 for row in rows)  # chance is 0.1
    assert r.stdout.count("| CW2 (E) |") == 1  # the table is printed once, by rank 0
    assert not list(out.glob("**/checkpoint.pt"))


UNEQUAL = (5, 7)   # per-rank batch sizes: the last batch of an epoch split unevenly


def _unequal_part(r):
    return torch.randn(UNEQUAL[r], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + r))


def _unequal_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        s = _unequal_part(rank).requires_grad_()
        allx = gather_with_grad(s)
        (allx ** 2 * torch.arange(1, allx.shape[0] + 1, dtype=torch.float64)[:, None]).sum().backward()
        # and a metric on the gathered global batch (rank sizes differ, the global batch does not)
        s2 = _unequal_part(rank).requires_grad_()
        t_all = torch.cat([_unequal_part(r) for r in range(WORLD)]) + 0.5
        w2 = KD2MLoss("w2", weight=1.0, match="global")
        off = sum(UNEQUAL[:rank])
        loss = w2(s2, t_all[off:off + UNEQUAL[rank]])
        loss.backward()
        torch.save({"x": allx.detach(), "grad": s.grad.clone(), "loss": loss.detach(), "w2_grad": s2.grad.clone()},
                   os.path.join(out_dir, f"unequal{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_with_unequal_per_rank_batches(tmp_path):
    """Ranks holding 5 and 7 samples: padded, gathered, trimmed to the 12 true rows in rank order,
    and each rank gets back the summed gradient of exactly its own rows."""
    mp.spawn(_unequal_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    out = [torch.load(tmp_path / f"unequal{r}.pt", weights_only=True) for r in range(WORLD)]
    parts = [_unequal_part(r) for r in range(WORLD)]
    full = torch.cat(parts)
    w = torch.arange(1, full.shape[0] + 1, dtype=torch.float64)[:, None]
    # single-process global-batch w2 and its gradient, as the oracle for match="global"
    s_all = full.clone().requires_grad_()
    ref = KD2MLoss("w2", weight=1.0, match="local")(s_all, full + 0.5)
    ref.backward()
    for r in range(WORLD):
        lo, hi = sum(UNEQUAL[:r]), sum(UNEQUAL[:r + 1])
        assert out[r]["x"].shape == (12, 4) and torch.equal(out[r]["x"], full)
        assert torch.allclose(out[r]["grad"], WORLD * 2 * w[lo:hi] * parts[r])
        assert torch.allclose(out[r]["loss"], ref.detach(), rtol=1e-12)
        # each rank's copy of L sends W × ∂L/∂(its rows) (DDP would then average by W)
        assert torch.allclose(out[r]["w2_grad"], WORLD * s_all.grad[lo:hi], rtol=1e-10, atol=1e-12)


def test_torchrun_two_processes_on_a_language_model_through_the_fused_head(tmp_path):
    """A causal LM student under torchrun trains through the fused head (its cross-entropy and
    forward KL from its hidden states and output layer) against a top-k teacher cache that each
    rank builds half of, with a distance on the hidden states matched over the global batch."""
    from helpers import python_docs_text
    corpus = python_docs_text(tmp_path / "corpus.txt", 8000)
    out = tmp_path / "ddp_lm"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kd2m", "run", "--task", "lm", "--dataset", f"text:{corpus}", "--epochs", "1", "--teacher-epochs", "1",
           "--seeds", "1", "--metrics", "gauss_w2", "--baselines", "ce,fkl", "--teacher-topk", "8", "--select-k", "none",
           "--image-size", "16", "--batch-size", "8", "--out", str(out), "--no-progress", "--device", "cpu"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "results.csv", newline="") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == ["ce", "fkl", "gauss_w2", "teacher"]
    assert all(1 < float(row["test_ppl"]) < 257 for row in rows.values())   # a byte vocabulary: below chance
    assert r.stdout.count("| FKL |") == 1
