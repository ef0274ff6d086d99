"""The token-level divergences (fkl, rkl, jsd, skew_kl, skew_rkl, tvd) against their definitions
written out here in float64, at the edges the formula tests in test_lm.py do not reach: a masked
vocabulary entry (a −inf logit, probability 0), every position ignored, the no-grad chunked
path with a last partial chunk, exactly ``chunk_size`` positions, and a teacher whose logits
require a gradient.

Each test fails on a one-line bug the rest of the suite let through: the 0·log 0 guard dropped
(NaN), the kept-position count not clamped (0/0), the last partial chunk dropped, a single chunk
sent down the first-order-only chunked path, the teacher's logits not detached."""
import math

import pytest
import torch

from kd2m import losses

NAMES = ["fkl", "rkl", "jsd", "skew_kl", "skew_rkl", "tvd"]
BETA, ALPHA = 0.5, 0.1   # the terms' defaults


def _kl_rows(p, q):
    """Σ_v p_v log(p_v / q_v) per row, the sum over the support of p only (0·log 0 = 0), in float64."""
    out = []
    for pr, qr in zip(p, q):
        support = pr > 0
        out.append((pr[support] * (pr[support].log() - qr[support].log())).sum())
    return torch.stack(out)


def oracle(name, zs, zt, labels=None):
    """Mean over the kept positions of the per-position divergence, from the probabilities."""
    ps, pt = torch.softmax(zs, -1), torch.softmax(zt, -1)
    if name == "fkl":
        d = _kl_rows(pt, ps)
    elif name == "rkl":
        d = _kl_rows(ps, pt)
    elif name == "jsd":
        m = (1 - BETA) * ps + BETA * pt
        d = BETA * _kl_rows(pt, m) + (1 - BETA) * _kl_rows(ps, m)
    elif name == "skew_kl":
        d = _kl_rows(pt, ALPHA * pt + (1 - ALPHA) * ps)
    elif name == "skew_rkl":
        d = _kl_rows(ps, ALPHA * ps + (1 - ALPHA) * pt)
    else:
        d = 0.5 * (pt - ps).abs().sum(-1)
    keep = torch.ones(d.shape[0], dtype=torch.bool) if labels is None else labels != -100
    return d[keep].sum() / keep.sum()


def _logits(n=6, v=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, v, generator=g, dtype=torch.float64), 2 * torch.randn(n, v, generator=g,
                                                                                     dtype=torch.float64)


def _call(name, zs, zt, labels=None, **options):
    return losses.get(name, **options)(student_logits=zs, teacher_logits=zt, labels=labels)


# -------------------------------------------------------------------------- masked vocabulary
@pytest.mark.parametrize("name", NAMES)
def test_a_vocabulary_entry_masked_in_both_models_is_a_zero_probability(name):
    """Entry 6 is −inf in both models' logits (a vocabulary padded past the tokenizer's): the value
    and the gradient are those of the same logits without that entry, and the masked entry gets a
    zero gradient, not NaN."""
    zs, zt = _logits()
    zs[:, 6] = zt[:, 6] = -math.inf
    zs.requires_grad_()
    got = _call(name, zs, zt)
    cut = zs[:, :6].detach().clone().requires_grad_()
    want = oracle(name, cut, zt[:, :6])
    assert math.isfinite(got.item()) and got.item() == pytest.approx(want.item(), rel=1e-10)
    g, = torch.autograd.grad(got, zs)
    g_want, = torch.autograd.grad(want, cut)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g[:, :6], g_want, rtol=1e-9, atol=1e-12)
    assert (g[:, 6] == 0).all()


@pytest.mark.parametrize("name", ["fkl", "jsd", "skew_kl", "skew_rkl", "tvd"])
def test_a_vocabulary_entry_only_the_teacher_masks_is_a_zero_teacher_probability(name):
    """The teacher gives entry 6 probability 0, the student does not: every term whose divergence
    stays finite there has the value of its definition (p_T log p_T = 0 at that entry)."""
    zs, zt = _logits(seed=1)
    zt[:, 6] = -math.inf
    zs.requires_grad_()
    got = _call(name, zs, zt)
    want = oracle(name, zs, zt)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    g, = torch.autograd.grad(got, zs)
    g_want, = torch.autograd.grad(want, zs)
    torch.testing.assert_close(g, g_want, rtol=1e-9, atol=1e-12)


def test_reverse_kl_to_a_teacher_that_excludes_a_student_token_is_infinite():
    zs, zt = _logits(seed=1)
    zt[:, 6] = -math.inf
    assert float(_call("rkl", zs, zt)) == math.inf


# ---------------------------------------------------------------------- every position ignored
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_every_position_ignored_gives_zero_and_a_zero_gradient(name, chunk_size):
    """A batch that is all prompt or padding: 0 (nothing to match), not 0/0 = NaN; on the plain path,
    the chunked one and without gradients alike."""
    zs, zt = _logits(seed=2)
    zs.requires_grad_()
    labels = torch.full((6,), -100)
    got = _call(name, zs, zt, labels, chunk_size=chunk_size)
    assert got.item() == 0.0
    g, = torch.autograd.grad(got, zs)
    assert (g == 0).all()
    with torch.no_grad():
        assert float(_call(name, zs, zt, labels, chunk_size=chunk_size)) == 0.0


# ------------------------------------------------------------------------------------ chunking
@pytest.mark.parametrize("name", NAMES)
def test_without_gradients_the_last_partial_chunk_counts(name):
    """7 positions in chunks of 3 (3 + 3 + 1), evaluated without gradients (an evaluation, a
    frozen student): every position is in the mean, the last one included."""
    zs, zt = _logits(n=7, seed=3)
    labels = torch.tensor([4, -100, 2, 0, 1, 3, 5])      # the lone position of the last chunk is kept
    want = oracle(name, zs, zt, labels)
    with torch.no_grad():
        got = _call(name, zs.clone().requires_grad_(), zt, labels, chunk_size=3)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    assert float(_call(name, zs, zt, labels, chunk_size=3)) == pytest.approx(want.item(), rel=1e-10)
    without_last = oracle(name, zs[:6], zt[:6], labels[:6])
    assert abs(without_last.item() - want.item()) > 1e-6   # the last position moves the mean


@pytest.mark.parametrize("name", NAMES)
def test_exactly_chunk_size_positions_is_one_chunk_with_plain_autograd(name):
    """6 positions with chunk_size 6: the value, the gradient and the second derivative (a
    Hessian-vector product, which the multi-chunk path does not provide) are the formula's."""
    zs, zt = _logits(seed=4)
    labels = torch.tensor([1, 2, -100, 3, 4, 5])
    zs.requires_grad_()
    got = _call(name, zs, zt, labels, chunk_size=6)
    want = oracle(name, zs, zt, labels)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    g, = torch.autograd.grad(got, zs, create_graph=True)
    g_want, = torch.autograd.grad(want, zs, create_graph=True)
    torch.testing.assert_close(g, g_want, rtol=1e-9, atol=1e-12)
    u = torch.randn(zs.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    hvp, = torch.autograd.grad((g * u).sum(), zs)
    hvp_want, = torch.autograd.grad((g_want * u).sum(), zs)
    torch.testing.assert_close(hvp, hvp_want, rtol=1e-8, atol=1e-11)
    assert hvp.abs().max() > 1e-3


# ----------------------------------------------------------------------------------- the teacher
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_no_gradient_reaches_the_teachers_logits(name, chunk_size):
    """A teacher run with gradients on (its logits require grad): the term trains the student
    only; the teacher's logits get no gradient."""
    zs, zt = _logits(seed=6)
    zs.requires_grad_()
    zt.requires_grad_()
    got = _call(name, zs, zt, chunk_size=chunk_size)
    g_s, g_t = torch.autograd.grad(got, [zs, zt], allow_unused=True)
    assert g_t is None
    assert g_s is not None and g_s.abs().max() > 0
