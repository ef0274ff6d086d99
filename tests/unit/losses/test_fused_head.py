"""fused_head_loss: the student's CE and a token divergence from hidden states and the output
layer, chunk by chunk, equal in value and gradient to the plain computation (logits built whole,
F.cross_entropy, the registered divergence), and never holding more than one chunk of logits."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kd2m import losses
from kd2m.losses.fused_head import LinearTeacher, fused_head_loss
from kd2m.losses.sparse_teacher import SparseTeacher

DIVERGENCES = ["fkl", "rkl", "jsd", "skew_kl", "skew_rkl", "tvd"]


def _head(n=23, d=6, v=13, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    w = (0.7 * torch.randn(v, d, generator=g, dtype=torch.float64)).requires_grad_()
    b = (0.3 * torch.randn(v, generator=g, dtype=torch.float64)).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[:3] = -100
    labels[-1] = -100
    zt = 2 * torch.randn(n, v, generator=g, dtype=torch.float64)
    return h, w, b, labels, zt


def _teacher(which, zt, temperature, seed=1):
    if which == "dense":
        return zt, zt
    if which == "sparse":
        return SparseTeacher.from_logits(zt, 4, temperature), SparseTeacher.from_logits(zt, 4, temperature)
    g = torch.Generator().manual_seed(seed)
    ht = torch.randn(zt.shape[0], 5, generator=g, dtype=torch.float64)
    wt = torch.randn(zt.shape[1], 5, generator=g, dtype=torch.float64)
    return LinearTeacher(ht, wt), ht @ wt.T


def unfused(h, w, b, labels, teacher_logits, kind, temperature, ce_weight, divergence_weight, **opts):
    """The plain computation: every logit at once, Hugging Face's CE, the registered term."""
    z = h @ w.T + (0 if b is None else b)
    ce = F.cross_entropy(z, labels, ignore_index=-100)
    div = losses.get(kind, temperature=temperature, **opts)(student_logits=z, teacher_logits=teacher_logits,
                                                           labels=labels)
    return ce_weight * ce + divergence_weight * div, ce, div


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("which", ["dense", "sparse", "linear"])
@pytest.mark.parametrize("chunk_size", [1, 5, 100])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_fused_head_equals_the_unfused_computation(kind, which, chunk_size, temperature):
    h, w, b, labels, zt = _head()
    teacher, teacher_logits = _teacher(which, zt, temperature)
    opts = {"beta": 0.3} if kind == "jsd" else {"alpha": 0.2} if kind.startswith("skew") else {}
    got = fused_head_loss(h, w, labels, teacher, bias=b, kind=kind, temperature=temperature, ce_weight=0.6,
                          divergence_weight=1.4, chunk_size=chunk_size, **opts)
    want, ce, div = unfused(h, w, b, labels, teacher_logits, kind, temperature, 0.6, 1.4, **opts)
    assert got.loss.dtype == torch.float64 and torch.allclose(got.loss, want, rtol=1e-12, atol=1e-14)
    assert torch.allclose(got.ce, ce.detach(), rtol=1e-12) and torch.allclose(got.divergence, div.detach(), rtol=1e-12)
    assert not got.ce.requires_grad and not got.divergence.requires_grad
    for a, c in zip(torch.autograd.grad(got.loss, (h, w, b)), torch.autograd.grad(want, (h, w, b))):
        assert torch.allclose(a, c, rtol=1e-10, atol=1e-13)


def test_fused_head_without_teacher_or_bias_is_cross_entropy_and_takes_batched_shapes():
    h, w, _, labels, _ = _head(n=24, bias=False, seed=2)
    got = fused_head_loss(h.reshape(4, 6, -1), w, labels.reshape(4, 6), chunk_size=7)
    want = F.cross_entropy(h @ w.T, labels, ignore_index=-100)
    assert torch.allclose(got.loss, want, rtol=1e-12) and float(got.divergence) == 0.0
    for a, c in zip(torch.autograd.grad(got.loss, (h, w)), torch.autograd.grad(want, (h, w))):
        assert torch.allclose(a, c, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", ["fkl", "jsd", "tvd"])
@pytest.mark.parametrize("which", ["dense", "sparse"])
def test_fused_head_gradcheck_in_float64(kind, which):
    h, w, b, labels, zt = _head(n=7, d=3, v=6, seed=3)
    teacher, _ = _teacher(which, zt, 1.3)
    assert torch.autograd.gradcheck(
        lambda h_, w_, b_: fused_head_loss(h_, w_, labels, teacher, bias=b_, kind=kind, temperature=1.3,
                                           chunk_size=3).loss, (h, w, b))


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an operator returns inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_fused_head_never_builds_more_than_one_chunk_of_logits():
    n, v, chunk = 64, 50, 8
    h, w, b, labels, zt = _head(n=n, d=4, v=v, seed=4)
    teacher = SparseTeacher.from_logits(zt, 5)
    with LargestTensor() as seen:
        fused_head_loss(h, w, labels, teacher, bias=b, kind="jsd", chunk_size=chunk).loss.backward()
    assert seen.largest <= 2 * chunk * v < n * v  # jsd stacks two (chunk, V) log-probabilities
    with LargestTensor() as seen:
        unfused(h, w, b, labels, teacher, "jsd", 1.0, 1.0, 1.0)[0].backward()
    assert seen.largest >= n * v


def test_fused_head_keeps_the_inputs_dtypes_and_checks_its_inputs():
    h, w, _, labels, zt = _head(seed=5)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    out = fused_head_loss(hb, wb, labels, zt.float(), chunk_size=4)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="kind must be one of"):
        fused_head_loss(h, w, labels, zt, kind="kl")
    with pytest.raises(ValueError, match="must share d"):
        fused_head_loss(h, w[:, :2], labels, zt)
    with pytest.raises(ValueError, match=r"teacher logits \(23, 12\) must be \(23, 13\)"):
        fused_head_loss(h, w, labels, zt[:, :12])
    with pytest.raises(ValueError, match="temperature 1.0, the term asks for temperature 2"):
        fused_head_loss(h, w, labels, SparseTeacher.from_logits(zt, 3), temperature=2.0)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_head_loss(h, w, labels, zt, chunk_size=0)
    with pytest.raises(ValueError, match="labels"):
        fused_head_loss(h, w, labels[:5], zt)


@pytest.mark.parametrize("beta,temperature", [(0.5, 1.0), (0.0, 2.0), (1.0, 1.0), (0.3, 0.7)])
def test_fused_jsd_against_a_linear_teacher_equals_trl_s_chunked_divergence(beta, temperature):
    # TRL's DistillationTrainer computes its generalised JSD from both models' last hidden states and
    # output layers, tile by tile: the same quantity as fused_head_loss(kind="jsd", ce_weight=0) with a
    # LinearTeacher, in value and in gradient (masked positions ignored by both; TRL's tiles compute in
    # float32 whatever the inputs, so the agreement is float32's)
    trl = pytest.importorskip("trl.trainer.distillation_trainer")
    g = torch.Generator().manual_seed(3)
    n, d_s, d_t, vocab = 14, 8, 12, 301
    hs = torch.randn(1, n, d_s, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(vocab, d_s, generator=g, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(1, n, d_t, generator=g, dtype=torch.float64), torch.randn(vocab, d_t, generator=g, dtype=torch.float64)
    mask = torch.ones(1, n)
    mask[0, :4] = 0
    labels = torch.randint(0, vocab, (n,), generator=g).masked_fill(mask[0] == 0, -100)
    theirs = trl._chunked_divergence_loss(hs, ht, ws, wt, mask, beta=beta, temperature=temperature)[0]
    ours = fused_head_loss(hs[0], ws, labels, LinearTeacher(ht[0], wt), kind="jsd", beta=beta,
                           temperature=temperature, ce_weight=0.0).loss
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-6, atol=1e-7)
    for a, b in zip(torch.autograd.grad(ours, (hs, ws)), torch.autograd.grad(theirs, (hs, ws))):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-7)
