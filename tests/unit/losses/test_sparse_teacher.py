"""SparseTeacher (top-k teacher log-probabilities and a tail bucket) and the token divergences
against it: exact at k = V, the ghost-token formula written out at k < V, DistillKit's and
ModelOpt's top-k KL losses restated, gradcheck, and the checks on its inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

from kd2m import losses
from kd2m.losses.sparse_teacher import SparseTeacher

DIVERGENCES = ["fkl", "rkl", "jsd", "skew_kl", "skew_rkl", "tvd"]


def _batch(b=3, length=5, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = (2 * torch.randn(b, length, v, generator=g, dtype=torch.float64)).requires_grad_()
    zt = 2 * torch.randn(b, length, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (b, length), generator=g)
    labels[0, :2] = -100
    labels[-1, -1] = -100
    return zs, zt, labels


def _kl(p, q):  # Σ p (log p − log q) in probability space
    return (p * (p.log() - q.log())).sum(-1)


def divergence_of_probs(name, ps, pt, beta=0.5, alpha=0.1):
    """Each divergence from its definition, per row of probability vectors (any width)."""
    if name == "fkl":
        return _kl(pt, ps)
    if name == "rkl":
        return _kl(ps, pt)
    if name == "jsd":
        m = (1 - beta) * ps + beta * pt
        return beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)
    if name == "skew_kl":
        return _kl(pt, alpha * pt + (1 - alpha) * ps)
    if name == "skew_rkl":
        return _kl(ps, alpha * ps + (1 - alpha) * pt)
    return 0.5 * (pt - ps).abs().sum(-1)


def ghost_formula(name, zs, zt, labels, k, temperature=1.0, **opts):
    """The ghost-token estimator written out: the teacher's k most probable tokens, then one
    bucket holding 1 − Σ of the kept probabilities, for both models; mean over kept positions."""
    v = zs.shape[-1]
    ps = F.softmax(zs.reshape(-1, v) / temperature, -1)
    pt = F.softmax(zt.reshape(-1, v) / temperature, -1)
    ids = pt.topk(k, -1).indices
    ks, kt = ps.gather(-1, ids), pt.gather(-1, ids)
    ps_bar = torch.cat([ks, 1 - ks.sum(-1, keepdim=True)], -1)
    pt_bar = torch.cat([kt, 1 - kt.sum(-1, keepdim=True)], -1)
    d = divergence_of_probs(name, ps_bar, pt_bar, **opts)
    keep = labels.reshape(-1) != -100
    return d[keep].sum() / keep.sum()


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_teacher_with_k_equal_to_v_is_the_dense_divergence(name, temperature):
    zs, zt, labels = _batch()
    term = losses.get(name, temperature=temperature)
    dense = term(student_logits=zs, teacher_logits=zt, labels=labels)
    sparse = term(student_logits=zs, teacher_logits=SparseTeacher.from_logits(zt, 11, temperature), labels=labels)
    assert sparse.dtype == torch.float64 and torch.allclose(sparse, dense, rtol=1e-13, atol=1e-15)
    g_dense, = torch.autograd.grad(dense, zs)
    g_sparse, = torch.autograd.grad(sparse, zs)
    assert torch.allclose(g_sparse, g_dense, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("k", [1, 4, 10])
def test_sparse_teacher_is_the_ghost_token_formula(name, k):
    zs, zt, labels = _batch(seed=1)
    opts = {"beta": 0.3} if name == "jsd" else {"alpha": 0.2} if name.startswith("skew") else {}
    term = losses.get(name, temperature=1.5, **opts)
    got = term(student_logits=zs, teacher_logits=SparseTeacher.from_logits(zt, k, 1.5), labels=labels)
    want = ghost_formula(name, zs, zt, labels, k, 1.5, **opts)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    g_got, = torch.autograd.grad(got, zs)
    g_want, = torch.autograd.grad(want, zs)
    assert torch.allclose(g_got, g_want, rtol=1e-10, atol=1e-13)
    # merging the tail into one token can only lower an f-divergence (data processing)
    full = float(term(student_logits=zs.detach(), teacher_logits=zt, labels=labels))
    assert 0.0 <= float(got.detach()) <= full + 1e-12


@pytest.mark.parametrize("name", DIVERGENCES)
def test_sparse_teacher_gradcheck_in_float64_over_chunks(name):
    zs, zt, labels = _batch(b=2, length=3, v=7, seed=2)
    teacher = SparseTeacher.from_logits(zt, 3, 1.3)
    term = losses.get(name, temperature=1.3, chunk_size=2)
    assert torch.autograd.gradcheck(lambda z: term(student_logits=z, teacher_logits=teacher, labels=labels), (zs,))


@pytest.mark.parametrize("name", DIVERGENCES)
def test_sparse_teacher_chunked_equals_whole(name):
    zs, zt, labels = _batch(b=4, length=7, seed=3)
    teacher = SparseTeacher.from_logits(zt, 5)
    kw = dict(student_logits=zs, teacher_logits=teacher, labels=labels)
    whole, chunked = losses.get(name, chunk_size=10_000)(**kw), losses.get(name, chunk_size=3)(**kw)
    assert torch.allclose(whole, chunked, rtol=1e-12)
    g1, = torch.autograd.grad(whole, zs)
    g2, = torch.autograd.grad(chunked, zs)
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-14)


def distillkit_symmetric_uniform_kl(logits, target_ids, target_logprobs, mask, eps=1e-6):
    """DistillKit's ``sparse_kl_div`` (distillkit/lossfuncs/kl.py) with
    ``missing=SYMMETRIC_UNIFORM``, log-probability targets and no temperature change, restated:
    Σ_kept q (log q − log p_S) plus the missing mass q_miss·(log q_miss − log p_miss), where each
    missing mass is log(1 − exp(logsumexp(kept))) with the kept sum clamped at −eps, and the
    term dropped where q_miss ≤ eps. Summed over masked positions (its KLDLoss divides by them)."""
    ls = logits - logits.logsumexp(-1, keepdim=True)
    sparse_s = ls.gather(-1, target_ids)

    def log_missing(lp):
        return torch.log(-torch.expm1(lp.logsumexp(-1).clamp(max=-eps)))
    inner = (target_logprobs.exp() * (target_logprobs - sparse_s)).sum(-1)
    lq, lp = log_missing(target_logprobs), log_missing(sparse_s)
    missing = torch.where(lq.exp() > eps, lq.exp() * (lq - lp), torch.zeros_like(lq))
    return ((inner + missing) * mask).sum()


def modelopt_top_logits_kl(student, teacher, top_k, temperature=1.0, reverse=False):
    """ModelOpt's ``TopLogitsKLLoss.forward`` (modelopt/torch/distill/plugins/megatron.py, one
    tensor-parallel rank, no top-p), restated in float64: both log-probabilities normalised over the
    full vocabulary, gathered at the teacher's top-k, a ghost token log(−expm1(logsumexp(kept)))
    with the kept sum clamped at −eps appended to both, KL per position (reverse swaps them)."""
    zt, zs = teacher / temperature, student / temperature
    top, idx = zt.topk(top_k, -1)
    q, p = top - zt.logsumexp(-1, keepdim=True), zs.gather(-1, idx) - zs.logsumexp(-1, keepdim=True)
    eps = torch.finfo(p.dtype).eps

    def ghost(lp):
        return torch.log(-torch.expm1(lp.logsumexp(-1, keepdim=True).clamp(max=-eps)))
    p, q = torch.cat([p, ghost(p)], -1), torch.cat([q, ghost(q)], -1)
    if reverse:
        p, q = q, p
    return (q.exp() * (q - p)).sum(-1)


@pytest.mark.parametrize("k", [2, 6])
def test_forward_kl_equals_distillkits_symmetric_uniform_sparse_kl(k):
    zs, zt, labels = _batch(seed=4)
    teacher = SparseTeacher.from_logits(zt, k)
    got = losses.get("fkl")(student_logits=zs, teacher_logits=teacher, labels=labels)
    mask = (labels != -100).to(torch.float64)
    want = distillkit_symmetric_uniform_kl(zs, teacher.ids.reshape(3, 5, k), teacher.logprobs.reshape(3, 5, k),
                                           mask) / mask.sum()
    assert torch.allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("name,reverse", [("fkl", False), ("rkl", True)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_and_reverse_kl_equal_modelopts_top_logits_kl(name, reverse, temperature):
    zs, zt, labels = _batch(seed=5)
    got = losses.get(name, temperature=temperature)(
        student_logits=zs, teacher_logits=SparseTeacher.from_logits(zt, 4, temperature), labels=labels)
    per = modelopt_top_logits_kl(zs, zt, 4, temperature, reverse).reshape(-1)
    keep = labels.reshape(-1) != -100
    want = per[keep].sum() / keep.sum()
    assert torch.allclose(got, want, rtol=1e-12)
    g_got, = torch.autograd.grad(got, zs)
    g_want, = torch.autograd.grad(want, zs)
    assert torch.allclose(g_got, g_want, rtol=1e-10, atol=1e-13)


def test_from_logits_holds_the_top_k_log_probabilities_and_the_tail():
    zt = torch.tensor([[3.0, 1.0, 0.0, -1.0, 2.0]], dtype=torch.float64)
    t = SparseTeacher.from_logits(zt, 2, temperature=2.0)
    p = F.softmax(zt / 2.0, -1)[0]
    assert t.ids.tolist() == [[0, 4]] and t.ids.dtype == torch.long
    assert torch.allclose(t.logprobs[0], p[[0, 4]].log(), rtol=1e-14)
    assert math.isclose(float(t.tail_logprob[0]), math.log(float(p[1] + p[2] + p[3])), rel_tol=1e-14)
    again = SparseTeacher.from_logprobs(t.ids, t.logprobs, 5, 2.0)
    assert torch.allclose(again.tail_logprob, t.tail_logprob, rtol=1e-12)
    assert SparseTeacher.from_logits(zt, 5).tail_logprob.tolist() == [-math.inf]
    assert SparseTeacher.from_logits(zt.float(), 2).bytes_per_token() == 2 * (8 + 4) + 4
    assert len(t) == 1 and t.k == 2 and t.rows(0, 1).ids is not None


def test_sparse_teacher_inputs_are_checked():
    zt = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"k=7 exceeds the vocabulary size V=6"):
        SparseTeacher.from_logits(zt, 7)
    with pytest.raises(ValueError, match=r"k must be a positive integer"):
        SparseTeacher.from_logits(zt, 0)
    good = SparseTeacher.from_logits(zt, 2)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 6\).*\[0, 6\]"):
        SparseTeacher(good.ids.clone().fill_(6).index_fill_(1, torch.tensor([0]), 0), good.logprobs,
                      good.tail_logprob, 6)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 6\)"):
        # a negative id in every row, whatever the random logits ranked first (good.ids - 1 holds none
        # where no row kept id 0)
        SparseTeacher(good.ids.clone().index_fill_(1, torch.tensor([0]), -1), good.logprobs, good.tail_logprob, 6)
    with pytest.raises(ValueError, match="int64"):
        SparseTeacher(good.ids.int(), good.logprobs, good.tail_logprob, 6)
    with pytest.raises(ValueError, match="tail_logprob"):
        SparseTeacher(good.ids, good.logprobs, good.tail_logprob[:2], 6)
    zs = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"temperature 1.0, the term asks for temperature 2"):
        losses.get("fkl", temperature=2.0)(student_logits=zs, teacher_logits=good)
    with pytest.raises(ValueError, match=r"covers 4 positions of a vocabulary of 6"):
        losses.get("fkl")(student_logits=torch.randn(4, 7), teacher_logits=good)
