"""The field's baselines as registered loss terms (kd2m.losses.logit / relational / maps).

Each term is checked against an oracle written here in numpy from the paper's formula with the
reductions, temperatures and eps of the authors' released code (the file is named at each
oracle), plus float64 gradcheck, finiteness on degenerate batches and clear errors.
"""
import math

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from kd2m import hinton_kd, losses
from kd2m.losses import TermContext

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

BASELINES = ["at", "crd", "dist", "dkd", "fitnet", "kd", "nst", "pkt", "rkd", "wkd_f", "wkd_l"]
#: the LLM field's token divergences, baselines too (tested against their formulas in tests/e2e/test_lm.py)
LLM_DIVERGENCES = ["fkl", "jsd", "rkl", "skew_kl", "skew_rkl", "tvd"]


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _logits(n=6, c=5, seed=0, scale=2.0):
    g = _g(seed)
    zs = (scale * torch.randn(n, c, generator=g, dtype=torch.float64)).requires_grad_(True)
    zt = scale * torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return zs, zt, y


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np(x):
    return x.detach().numpy().astype(np.float64)


def _head(c=5, d=7, seed=3):
    return torch.randn(c, d, generator=_g(seed), dtype=torch.float64)


def _ctx_for(name, n_data=40):
    """A context (and the call's inputs) for each term at small sizes, float64."""
    g = _g(11)
    if name in ("fitnet", "at", "nst", "wkd_f"):
        s = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)
        t = torch.randn(4, 5, 4, 4, generator=g, dtype=torch.float64)
        return TermContext(student_shape=(3, 6, 6), teacher_shape=(5, 4, 4)), dict(student_feats=s, teacher_feats=t)
    if name in ("pkt", "rkd", "crd"):
        s = torch.randn(5, 4, generator=g, dtype=torch.float64)
        t = torch.randn(5, 6, generator=g, dtype=torch.float64)
        return (TermContext(student_shape=(4,), teacher_shape=(6,), num_data=n_data,
                            train_labels=torch.arange(n_data) % 3),
                dict(student_feats=s, teacher_feats=t, index=torch.tensor([0, 3, 7, 9, 12])))
    zs, zt, y = _logits(n=5, c=5, seed=12)
    return (TermContext(num_classes=5, teacher_head=_head()),
            dict(student_logits=zs.detach(), teacher_logits=zt, labels=y))


def _term(name, ctx, double=True, **options):
    term = losses.get(name, ctx, **options)
    term = term.double() if double else term
    if name == "crd":  # fixed negatives and frozen banks: a deterministic function of the inputs
        idx = torch.tensor([[0, 1, 2, 5], [3, 0, 9, 9], [7, 8, 1, 2], [9, 4, 4, 0], [12, 30, 2, 1]])
        term.contrast_index = lambda index: idx[: len(index)]
        term.eval()
    return term


# ---------------------------------------------------------------- registry facts

def test_available_lists_every_baseline_with_its_facts():
    assert set(BASELINES) <= set(losses.available())
    assert losses.available("baseline") == sorted(BASELINES + LLM_DIVERGENCES)
    facts = {"kd": ("KD", {"logits"}), "dkd": ("DKD", {"logits", "labels"}), "dist": ("DIST", {"logits"}),
             "wkd_l": ("WKD-L", {"logits", "labels"}), "pkt": ("PKT", {"feats"}), "rkd": ("RKD", {"feats"}),
             "crd": ("CRD", {"feats", "index"}), "fitnet": ("FitNets", {"maps"}), "at": ("AT", {"maps"}),
             "nst": ("NST", {"maps"}), "wkd_f": ("WKD-F", {"maps"})}
    for name, (label, needs) in facts.items():
        s = losses.spec(name)
        assert (s.label, set(s.needs), s.family) == (label, needs, "baseline")
        assert s.paper
    assert losses.spec("dkd").warmup == 20
    assert all(losses.spec(n).warmup == 0 for n in BASELINES + LLM_DIVERGENCES if n != "dkd")
    assert all(set(losses.spec(n).needs) == {"logits", "labels"} and losses.spec(n).weight == 1.0
               for n in LLM_DIVERGENCES)
    assert losses.spec("pkt").pairwise_factor > 0 and losses.spec("rkd").pairwise_factor > 0
    assert dict(losses.spec("dkd").defaults) == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "standardize": False}
    assert dict(losses.spec("crd").defaults) == {"feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5,
                                                 "negatives": "other_class"}
    assert dict(losses.spec("rkd").defaults)["distance_weight"] == 25.0
    # WKD (JiamingLv/WKD 214cf88) configs/cifar100/wkd_f/res32x4_res8x4.yaml and wkd_l/res32x4_res8x4.yaml
    assert dict(losses.spec("wkd_f").defaults) == {"mean_cov_ratio": 4.0, "spatial_grid": 1, "eps": 1e-5,
                                                   "projector": "conv1x1"}
    assert (losses.spec("wkd_f").weight, losses.spec("wkd_f").ce_weight) == (0.08, 1.0)
    assert "NeurIPS 2024" in losses.spec("wkd_f").paper and losses.spec("wkd_f").pairwise_factor == 0
    assert dict(losses.spec("wkd_l").defaults) == {"temperature": 8.0, "gamma": 600.0, "sinkhorn_reg": 0.05,
                                                   "sinkhorn_iter": 10, "sharpen": 1.0, "target": True}


@pytest.mark.parametrize("name", BASELINES)
def test_unknown_option_is_refused(name):
    ctx, _ = _ctx_for(name)
    with pytest.raises(ValueError, match=f"loss term {name!r} has no option.*bogus"):
        losses.get(name, ctx, bogus=1)


def test_warmup_fact_is_validated():
    with pytest.raises(ValueError, match="warmup must be an int"):
        losses.register_term("x_bad_warmup", label="X", needs=("logits",), warmup=-1)


# ---------------------------------------------------------------- kd

def _kd_oracle(zs, zt, temperature, standardize=False, ddof=1):
    zs, zt = _np(zs), _np(zt)
    if standardize:
        zs = (zs - zs.mean(1, keepdims=True)) / (zs.std(1, ddof=ddof, keepdims=True) + 1e-7)
        zt = (zt - zt.mean(1, keepdims=True)) / (zt.std(1, ddof=ddof, keepdims=True) + 1e-7)
    ps, pt = _softmax(zs / temperature), _softmax(zt / temperature)
    return temperature ** 2 * np.mean(np.sum(pt * np.log(pt / ps), axis=1))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("standardize", [False, True])
def test_kd_matches_hinton_formula(temperature, standardize):
    # mdistiller/distillers/KD.py and logit-standardization-KD mdistiller/distillers/KD.py
    zs, zt, _ = _logits()
    value = losses.get("kd", temperature=temperature, standardize=standardize)(student_logits=zs, teacher_logits=zt)
    assert float(value) == pytest.approx(_kd_oracle(zs, zt, temperature, standardize), rel=1e-10)


def test_kd_standardizes_with_the_unbiased_std():
    zs, zt, _ = _logits(c=4, scale=3.0)
    value = float(losses.get("kd", standardize=True)(student_logits=zs, teacher_logits=zt))
    assert value == pytest.approx(_kd_oracle(zs, zt, 4.0, True, ddof=1), rel=1e-10)
    assert value != pytest.approx(_kd_oracle(zs, zt, 4.0, True, ddof=0), rel=1e-3)


def test_kd_equals_hinton_kd_and_is_shift_invariant_when_standardized():
    zs, zt, _ = _logits()
    assert torch.allclose(losses.get("kd")(student_logits=zs.float(), teacher_logits=zt.float()),
                          hinton_kd(zs, zt, 4.0), atol=1e-6)
    kd_std = losses.get("kd", standardize=True)
    a = kd_std(student_logits=zs, teacher_logits=zt)
    b = kd_std(student_logits=3.0 * zs + 1.0, teacher_logits=0.5 * zt - 2.0)
    assert torch.allclose(a, b, atol=1e-6)  # z-scoring removes per-sample scale and shift


# ---------------------------------------------------------------- dkd

def _dkd_oracle(zs, zt, y, alpha, beta, temperature):
    # mdistiller/distillers/DKD.py, written per sample: binary KL on (target, rest) and KL over
    # the non-target classes, both × T², summed and divided by n
    zs, zt, y = _np(zs), _np(zt), y.numpy()
    n, c = zs.shape
    tckd = nckd = 0.0
    for i in range(n):
        ps, pt = _softmax(zs[i] / temperature), _softmax(zt[i] / temperature)
        bs = np.array([ps[y[i]], 1 - ps[y[i]]])
        bt = np.array([pt[y[i]], 1 - pt[y[i]]])
        tckd += np.sum(bt * np.log(bt / bs))
        keep = np.arange(c) != y[i]
        qs, qt = _softmax(zs[i, keep] / temperature), _softmax(zt[i, keep] / temperature)
        nckd += np.sum(qt * np.log(qt / qs))
    return temperature ** 2 * (alpha * tckd + beta * nckd) / n


@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_decoupled_formula(alpha, beta, temperature):
    zs, zt, y = _logits(n=7, c=6)
    value = losses.get("dkd", alpha=alpha, beta=beta, temperature=temperature)(
        student_logits=zs, teacher_logits=zt, labels=y)
    assert float(value) == pytest.approx(_dkd_oracle(zs, zt, y, alpha, beta, temperature), rel=1e-9)


def test_dkd_recomposes_kd_as_in_the_paper():
    # Zhao et al. Eq. (1): KD = TCKD + (1 - p^T_target) NCKD, per sample
    zs, zt, y = _logits(n=1, c=5, seed=4)
    p_target = float(F.softmax(zt / 4.0, dim=1)[0, y[0]])
    dkd = losses.get("dkd", alpha=1.0, beta=1.0 - p_target)(student_logits=zs, teacher_logits=zt, labels=y)
    assert float(dkd) == pytest.approx(float(losses.get("kd")(student_logits=zs, teacher_logits=zt)), rel=1e-9)


def test_dkd_standardize_matches_formula_on_zscored_logits():
    zs, zt, y = _logits(n=5, c=4, seed=5)
    z = lambda x: (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-7)  # noqa: E731
    value = losses.get("dkd", standardize=True)(student_logits=zs, teacher_logits=zt, labels=y)
    assert float(value) == pytest.approx(_dkd_oracle(z(zs.detach()), z(zt), y, 1.0, 8.0, 4.0), rel=1e-9)


# ---------------------------------------------------------------- dist

def _dist_oracle(zs, zt, beta, gamma, temperature):
    # hunto/DIST_KD: 1 - mean Pearson over rows (inter) and over columns (intra), × τ²
    ys, yt = _softmax(_np(zs) / temperature), _softmax(_np(zt) / temperature)
    inter = 1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(len(ys))])
    intra = 1 - np.mean([np.corrcoef(ys[:, c], yt[:, c])[0, 1] for c in range(ys.shape[1])])
    return temperature ** 2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize("beta,gamma,temperature", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_pearson_relations(beta, gamma, temperature):
    zs, zt, _ = _logits(n=8, c=5)
    value = losses.get("dist", beta=beta, gamma=gamma, temperature=temperature)(student_logits=zs, teacher_logits=zt)
    assert float(value) == pytest.approx(_dist_oracle(zs, zt, beta, gamma, temperature), rel=1e-6)


def test_dist_vanishes_for_a_copy_of_the_teacher_up_to_its_eps():
    _, zt, _ = _logits(n=8, c=5)
    # only the 1e-8 in the denominator keeps it above 0: 1 - ‖a‖²/(‖a‖² + 1e-8) per relation
    assert float(losses.get("dist")(student_logits=zt.clone(), teacher_logits=zt)) == pytest.approx(0.0, abs=1e-5)


# ---------------------------------------------------------------- wkd_l

def _wkd_oracle(zs, zt, y, head, temperature, gamma, reg, iters, sharpen):
    # JiamingLv/WKD mdistiller/distillers/WKD.py, literally: cost from the fc prototypes, the
    # target column removed, per-sample (C-1)x(C-1) cost, Sinkhorn from u = 1/(C-1) with 1e-8
    zs, zt, y, w = _np(zs), _np(zt), y.numpy(), _np(head)
    n, c = zs.shape
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    cost = 1 - w @ w.T
    cost = 1 - np.exp(-sharpen * cost)
    target = -np.mean([_softmax(zt[i])[y[i]] * np.log(_softmax(zs[i])[y[i]]) for i in range(n)])
    transport = []
    for i in range(n):
        keep = np.arange(c) != y[i]
        a, b = _softmax(zs[i, keep] / temperature), _softmax(zt[i, keep] / temperature)
        m = np.maximum(cost[np.ix_(keep, keep)], 0) + 1e-8
        k = np.exp(-m / reg)
        u = np.full(c - 1, 1.0 / (c - 1))
        for _ in range(iters):
            v = b / (k.T @ u + 1e-8)
            u = a / (k @ v + 1e-8)
        transport.append(np.sum(u[:, None] * k * v[None, :] * m))
    return target + gamma * np.mean(transport)


@pytest.mark.parametrize("options", [{}, dict(temperature=2.0, gamma=3.0, sinkhorn_reg=0.5, sinkhorn_iter=25,
                                              sharpen=2.0)])
def test_wkd_l_matches_the_authors_sinkhorn(options):
    zs, zt, y = _logits(n=6, c=5)
    head = _head()
    term = losses.get("wkd_l", TermContext(num_classes=5, teacher_head=head), **options)
    value = term(student_logits=zs, teacher_logits=zt, labels=y)
    o = dict(losses.spec("wkd_l").defaults) | options
    expected = _wkd_oracle(zs, zt, y, head, o["temperature"], o["gamma"], o["sinkhorn_reg"], o["sinkhorn_iter"],
                           o["sharpen"])
    assert float(value) == pytest.approx(expected, rel=1e-5)


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
def test_wkd_l_transport_is_pots_sinkhorn_plan():
    # with a wide kernel the 1e-8 guards are negligible and the authors' iteration is POT's
    # sinkhorn_knopp (u = 1/dim start, v then u updates) stopped after the same number of iterations
    zs, zt, y = _logits(n=3, c=4, seed=6)
    head = _head(c=4)
    options = dict(temperature=1.0, gamma=1.0, sinkhorn_reg=1.0, sinkhorn_iter=7, sharpen=1.0)
    value = losses.get("wkd_l", TermContext(teacher_head=head), **options)(
        student_logits=zs, teacher_logits=zt, labels=y)
    cost = losses.logit.class_cost_from_head(head)
    total = 0.0
    for i in range(3):
        keep = torch.arange(4) != y[i]
        a = F.softmax(zs[i, keep].detach(), 0).numpy()
        b = F.softmax(zt[i, keep], 0).numpy()
        m = cost[keep][:, keep].numpy() + 1e-8
        plan = ot.sinkhorn(a, b, m, 1.0, numItermax=7, stopThr=0.0)
        total += float(np.sum(plan * m))
    at_label = lambda p: p.gather(1, y[:, None])  # noqa: E731
    target = -float((at_label(F.softmax(zt, 1)) * at_label(F.log_softmax(zs.detach(), 1))).mean())
    assert float(value) == pytest.approx(target + total / 3, rel=1e-6)


def test_wkd_l_needs_the_teacher_head():
    with pytest.raises(ValueError, match="teacher's classifier weight"):
        losses.get("wkd_l", TermContext(num_classes=5))
    with pytest.raises(ValueError, match="teacher_head has 5 rows but num_classes=6"):
        losses.get("wkd_l", TermContext(num_classes=6, teacher_head=_head()))
    term = losses.get("wkd_l", TermContext(teacher_head=_head()))
    zs, zt, y = _logits(c=4)
    with pytest.raises(ValueError, match="4 classes but the cost"):
        term(student_logits=zs, teacher_logits=zt, labels=y)


def test_wkd_l_splits_into_its_target_and_wasserstein_parts():
    # WKD decays only γ·WD (WKD.py forward_train): gamma=0 is the target-class part alone, target=False
    # the Wasserstein part alone; together they are the whole term
    zs, zt, y = _logits(n=6, c=5)
    head, ctx = _head(), TermContext(num_classes=5, teacher_head=_head())
    value = {o: float(losses.get("wkd_l", ctx, **dict(o))(student_logits=zs, teacher_logits=zt, labels=y))
             for o in [(), (("gamma", 0.0),), (("gamma", 1.0), ("target", False))]}
    oracle = _wkd_oracle(zs, zt, y, head, 8.0, 1.0, 0.05, 10, 1.0)
    target = _wkd_oracle(zs, zt, y, head, 8.0, 0.0, 0.05, 10, 1.0)
    assert value[(("gamma", 0.0),)] == pytest.approx(target, rel=1e-10)
    assert value[(("gamma", 1.0), ("target", False))] == pytest.approx(oracle - target, rel=1e-5)
    assert value[()] == pytest.approx(target + 600.0 * (oracle - target), rel=1e-5)


# ---------------------------------------------------------------- pkt

def _pkt_oracle(s, t, eps=1e-7):
    # mdistiller/distillers/PKT.py: cosine kernel scaled to [0, 1], rows normalised, mean over n²
    def cond(x):
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
        k = (x @ x.T + 1) / 2
        return k / k.sum(1, keepdims=True)
    qs, qt = cond(_np(s)), cond(_np(t))
    return np.mean(qt * np.log((qt + eps) / (qs + eps)))


def test_pkt_matches_the_cosine_kernel_kl():
    g = _g(1)
    s, t = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(7, 9, generator=g, dtype=torch.float64)
    assert float(losses.get("pkt")(student_feats=s, teacher_feats=t)) == pytest.approx(_pkt_oracle(s, t), rel=1e-10)
    assert float(losses.get("pkt")(student_feats=t, teacher_feats=t)) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- rkd

def _huber(a, b):
    d = np.abs(a - b)
    return np.where(d < 1, 0.5 * d ** 2, d - 0.5)


def _rkd_oracle(s, t, wd=25.0, wa=50.0, eps=1e-12):
    # mdistiller/distillers/RKD.py: distances clamped at eps then sqrt, zero diagonal, divided by
    # the mean positive distance; angles at each vertex; smooth-L1 means over n² and n³ entries
    def dist(x):
        n = len(x)
        d = np.array([[0.0 if i == j else math.sqrt(max(np.sum((x[i] - x[j]) ** 2), eps)) for j in range(n)]
                      for i in range(n)])
        return d / d[d > 0].mean()

    def angles(x):
        n = len(x)
        out = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    a, b = x[j] - x[i], x[k] - x[i]
                    na, nb = np.linalg.norm(a), np.linalg.norm(b)
                    out[i, j, k] = 0.0 if na == 0 or nb == 0 else a @ b / (na * nb)
        return out
    s, t = _np(s), _np(t)
    return wd * _huber(dist(s), dist(t)).mean() + wa * _huber(angles(s), angles(t)).mean()


def test_rkd_matches_distance_and_angle_relations():
    g = _g(2)
    s, t = torch.randn(6, 3, generator=g, dtype=torch.float64), 3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    assert float(losses.get("rkd")(student_feats=s, teacher_feats=t)) == pytest.approx(_rkd_oracle(s, t), rel=1e-10)
    value = losses.get("rkd", distance_weight=1.0, angle_weight=0.0)(student_feats=s, teacher_feats=t)
    assert float(value) == pytest.approx(_rkd_oracle(s, t, 1.0, 0.0), rel=1e-10)
    # both relations are invariant to scale and translation of the embedding
    assert float(losses.get("rkd")(student_feats=2.0 * t + 1.0, teacher_feats=t)) == pytest.approx(0.0, abs=1e-10)


def test_rkd_refuses_a_single_sample():
    with pytest.raises(ValueError, match="at least 2 samples"):
        losses.get("rkd")(student_feats=torch.randn(1, 3), teacher_feats=torch.randn(1, 3))


# ---------------------------------------------------------------- crd

def _crd_oracle(term, s, t, idx):
    # RepDistiller crd/criterion.py + crd/memory.py: embeddings, bank rows at idx, exp(·/T)/Z,
    # Z = N·mean at the first call, NCE with noise K/N and eps 1e-7, student + teacher parts
    ws, bs = _np(term.embed_s.weight), _np(term.embed_s.bias)
    wt, bt = _np(term.embed_t.weight), _np(term.embed_t.bias)
    vs, vt = _np(s) @ ws.T + bs, _np(t) @ wt.T + bt
    vs /= np.sqrt((vs ** 2).sum(1, keepdims=True))
    vt /= np.sqrt((vt ** 2).sum(1, keepdims=True))
    mem_s, mem_t = _np(term.memory_s), _np(term.memory_t)
    idx = idx.numpy()
    n_data, k, tau = term.num_data, term.nce_k, term.nce_t
    h_s = np.exp(np.einsum("nkf,nf->nk", mem_t[idx], vs) / tau)
    h_t = np.exp(np.einsum("nkf,nf->nk", mem_s[idx], vt) / tau)
    h_s, h_t = h_s / (h_s.mean() * n_data), h_t / (h_t.mean() * n_data)

    def nce(h):
        noise = k / n_data
        return -(np.log(h[:, 0] / (h[:, 0] + noise + 1e-7)).sum()
                 + np.log(noise / (h[:, 1:] + noise + 1e-7)).sum()) / len(h)
    return nce(h_s) + nce(h_t), vs, vt, mem_s, mem_t


def test_crd_matches_repdistiller_and_updates_its_banks():
    torch.manual_seed(0)
    ctx, inputs = _ctx_for("crd", n_data=40)
    term = losses.get("crd", ctx, feat_dim=8, nce_k=3).double()
    idx = torch.tensor([[0, 1, 2, 5], [3, 0, 9, 9], [7, 8, 1, 2], [9, 4, 4, 0], [12, 30, 2, 1]])
    term.contrast_index = lambda index: idx
    expected, vs, vt, mem_s, mem_t = _crd_oracle(term, inputs["student_feats"], inputs["teacher_feats"], idx)
    value = term(**inputs)
    assert float(value) == pytest.approx(expected, rel=1e-9)
    # the momentum update, then renormalisation, at the batch's own rows only
    rows = inputs["index"].numpy()
    for bank, before, v in ((term.memory_s, mem_s, vs), (term.memory_t, mem_t, vt)):
        moved = 0.5 * before[rows] + 0.5 * v
        np.testing.assert_allclose(_np(bank)[rows], moved / np.linalg.norm(moved, axis=1, keepdims=True), rtol=1e-12)
        others = np.setdiff1d(np.arange(40), rows)
        np.testing.assert_array_equal(_np(bank)[others], before[others])
    # Z stays fixed after the first call; in eval mode the banks do not move
    z = (float(term.z_s), float(term.z_t))
    term.eval()
    banks = (term.memory_s.clone(), term.memory_t.clone())
    term(**inputs)
    assert (float(term.z_s), float(term.z_t)) == z
    assert torch.equal(term.memory_s, banks[0]) and torch.equal(term.memory_t, banks[1])


def test_crd_draws_uniform_negatives_after_the_positive_and_clamps_k():
    ctx, inputs = _ctx_for("crd", n_data=40)
    term = losses.get("crd", ctx, negatives="uniform")
    assert term.nce_k == 39  # 16384 clamped to num_data - 1
    idx = term.contrast_index(inputs["index"])
    assert idx.shape == (5, 40) and torch.equal(idx[:, 0], inputs["index"])
    assert int(idx.min()) >= 0 and int(idx.max()) < 40
    assert torch.isfinite(term(**inputs))
    # uniform needs no labels (the memory's fallback)
    assert losses.get("crd", TermContext(student_shape=(4,), teacher_shape=(6,), num_data=40),
                      negatives="uniform").negatives == "uniform"


def test_crd_draws_negatives_of_other_classes_without_replacement_by_default():
    # RepDistiller's --mode exact: np.random.choice(cls_negative[target], k, replace=k > len(cls_negative[target]))
    labels = torch.tensor([0] * 10 + [1] * 6 + [2] * 4)            # 20 samples; class 0 has 10 others
    ctx = TermContext(student_shape=(4,), teacher_shape=(6,), num_data=20, train_labels=labels)
    index = torch.tensor([0, 12, 19, 3])
    term = losses.get("crd", ctx, nce_k=8)
    assert term.negatives == "other_class" and not term.replace
    torch.manual_seed(0)
    for _ in range(20):
        idx = term.contrast_index(index)
        assert idx.shape == (4, 9) and torch.equal(idx[:, 0], index)
        for row, i in zip(idx, index):
            negatives = row[1:]
            assert not (labels[negatives] == labels[i]).any()           # never a sample of its own class
            assert len(negatives.unique()) == 8                         # no sample twice
    # class 0 has 10 others: K = 10 still without replacement, and every other-class sample is drawn
    full = losses.get("crd", ctx, nce_k=10)
    assert not full.replace
    assert set(full.contrast_index(torch.tensor([0]))[0, 1:].tolist()) == set(range(10, 20))
    # K = 12 > 10 others of class 0: with replacement, as RepDistiller
    over = losses.get("crd", ctx, nce_k=12)
    assert over.replace
    row = over.contrast_index(torch.tensor([5]))[0, 1:]
    assert len(row) == 12 and not (labels[row] == 0).any()
    s, t = torch.randn(4, 4), torch.randn(4, 6)
    assert torch.isfinite(term(student_feats=s, teacher_feats=t, index=index))
    # the labels are data, not state: the checkpointed state_dict is the same as uniform's
    assert set(term.state_dict()) == set(losses.get("crd", ctx, nce_k=8, negatives="uniform").state_dict())


def test_crd_other_class_negatives_need_labels():
    base = dict(student_shape=(4,), teacher_shape=(6,), num_data=10)
    with pytest.raises(ValueError, match="needs every training sample's label.*negatives='uniform'"):
        losses.get("crd", TermContext(**base))
    with pytest.raises(ValueError, match=r"train_labels must be \(10,\) integer labels"):
        losses.get("crd", TermContext(**base, train_labels=torch.zeros(9, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"train_labels must be \(10,\) integer labels"):
        losses.get("crd", TermContext(**base, train_labels=torch.zeros(10)))
    with pytest.raises(ValueError, match=r"train_labels must be \(10,\) integer labels"):
        losses.get("crd", TermContext(**base, train_labels=-torch.ones(10, dtype=torch.long)))
    with pytest.raises(ValueError, match="every training sample has the same label"):
        losses.get("crd", TermContext(**base, train_labels=torch.zeros(10, dtype=torch.long)))
    with pytest.raises(ValueError, match="negatives must be one of other_class, uniform"):
        losses.get("crd", TermContext(**base), negatives="hard")


def test_crd_needs_shapes_and_num_data():
    with pytest.raises(ValueError, match="num_data must be an int"):
        losses.get("crd", TermContext(student_shape=(4,), teacher_shape=(6,)))
    with pytest.raises(ValueError, match=r"student_shape must be \(d,\)"):
        losses.get("crd", TermContext(student_shape=(3, 4, 4), teacher_shape=(6,), num_data=10))
    term = losses.get("crd", TermContext(student_shape=(4,), teacher_shape=(6,), num_data=10), negatives="uniform")
    with pytest.raises(ValueError, match=r"index must lie in \[0, 10\)"):
        term(student_feats=torch.randn(2, 4), teacher_feats=torch.randn(2, 6), index=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="needs index"):
        term(student_feats=torch.randn(2, 4), teacher_feats=torch.randn(2, 6), index=None)
    with pytest.raises(ValueError, match="width 5 but TermContext.student_shape said 4"):
        term(student_feats=torch.randn(2, 5), teacher_feats=torch.randn(2, 6), index=torch.tensor([0, 1]))


# ---------------------------------------------------------------- fitnet

def _batchnorm_relu(x, bn):
    # training-mode BatchNorm2d: biased batch variance, eps 1e-5, then ReLU
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    y = (x - mean) / np.sqrt(var + bn.eps) * _np(bn.weight)[None, :, None, None] + _np(bn.bias)[None, :, None, None]
    return np.maximum(y, 0)


@pytest.mark.parametrize("s_shape,t_shape,kind,kernel", [
    ((3, 8, 8), (5, 4, 4), torch.nn.Conv2d, (3, 3)),            # h_s = 2 h_t: 3x3 stride 2
    ((3, 4, 4), (5, 8, 8), torch.nn.ConvTranspose2d, (4, 4)),   # 2 h_s = h_t: 4x4 transposed
    ((3, 6, 6), (5, 4, 4), torch.nn.Conv2d, (3, 3)),            # h_s > h_t: (1 + 6 - 4) kernel
    ((3, 4, 4), (5, 4, 4), torch.nn.Conv2d, (1, 1)),            # equal: 1x1
])
def test_fitnet_regresses_like_convreg_then_mse(s_shape, t_shape, kind, kernel):
    # mdistiller/distillers/_common.py ConvReg + FitNet.py F.mse_loss
    torch.manual_seed(0)
    term = losses.get("fitnet", TermContext(student_shape=s_shape, teacher_shape=t_shape)).double()
    conv, bn = term.regressor[0], term.regressor[1]
    assert type(conv) is kind and conv.kernel_size == kernel
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    g = _g(3)
    s = torch.randn(3, *s_shape, generator=g, dtype=torch.float64)
    t = torch.randn(3, *t_shape, generator=g, dtype=torch.float64)
    if kind is torch.nn.Conv2d:
        x = F.conv2d(s, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding)
    else:
        x = F.conv_transpose2d(s, conv.weight, conv.bias, stride=2, padding=1)
    expected = np.mean((_batchnorm_relu(_np(x), bn) - _np(t)) ** 2)
    assert float(term(student_feats=s, teacher_feats=t)) == pytest.approx(expected, rel=1e-10)


def test_fitnet_refuses_incompatible_or_pooled_shapes():
    with pytest.raises(ValueError, match="no regressor maps a student map of 3×3 onto a teacher map of 8×8"):
        losses.get("fitnet", TermContext(student_shape=(2, 3, 3), teacher_shape=(4, 8, 8)))
    with pytest.raises(ValueError, match=r"needs \(n, c, h, w\) feature maps; the student has no 4-D layer"):
        losses.get("fitnet", TermContext(student_shape=(16,), teacher_shape=(4, 8, 8)))
    term = losses.get("fitnet", TermContext(student_shape=(2, 4, 4), teacher_shape=(3, 4, 4)))
    with pytest.raises(ValueError, match=r"regressor was built for \(2, 4, 4\)"):
        term(student_feats=torch.randn(2, 2, 5, 5), teacher_feats=torch.randn(2, 3, 4, 4))


# ---------------------------------------------------------------- at, nst

def _avg_pool_by(x, f):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // f, f, w // f, f).mean(axis=(3, 5))


def _at_oracle(s, t, p=2.0):
    # mdistiller/distillers/AT.py: mean over channels of F^p, flattened, L2-normalised; mean of squares
    def att(x):
        a = (x ** p).mean(1).reshape(len(x), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)
    return np.mean((att(s) - att(t)) ** 2)


def _nst_oracle(s, t):
    # mdistiller/distillers/NST.py: channels L2-normalised over positions, poly kernel (a·b)²,
    # MMD² = mean k(t,t) + mean k(s,s) - 2 mean k(s,t) over samples and channel pairs
    def norm(x):
        x = x.reshape(x.shape[0], x.shape[1], -1)
        return x / np.linalg.norm(x, axis=2, keepdims=True)
    fs, ft = norm(s), norm(t)

    def k(a, b):
        return np.mean([(a[i, j] @ b[i, l]) ** 2 for i in range(len(a)) for j in range(a.shape[1])
                        for l in range(b.shape[1])])
    return k(ft, ft) + k(fs, fs) - 2 * k(fs, ft)


@pytest.mark.parametrize("name,oracle", [("at", _at_oracle), ("nst", _nst_oracle)])
def test_map_terms_match_formula_with_pooling(name, oracle):
    g = _g(4)
    s = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.randn(3, 6, 4, 4, generator=g, dtype=torch.float64)
    term = losses.get(name)
    # student map larger: pooled 2x2 down to the teacher's 4x4; and the other way round
    assert float(term(student_feats=s, teacher_feats=t)) == pytest.approx(oracle(_avg_pool_by(_np(s), 2), _np(t)),
                                                                         rel=1e-10)
    assert float(term(student_feats=t, teacher_feats=s)) == pytest.approx(oracle(_np(t), _avg_pool_by(_np(s), 2)),
                                                                         rel=1e-10)
    assert float(term(student_feats=t, teacher_feats=t)) == pytest.approx(0.0, abs=1e-12)


def test_at_power_option():
    g = _g(5)
    s, t = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g,
                                                                                dtype=torch.float64)
    s, t = s.abs(), t.abs()
    value = losses.get("at", p=3.0)(student_feats=s, teacher_feats=t)
    assert float(value) == pytest.approx(_at_oracle(_np(s), _np(t), 3.0), rel=1e-10)


@pytest.mark.parametrize("name", ["fitnet", "at", "nst", "wkd_f"])
def test_map_terms_refuse_pooled_features(name):
    ctx, inputs = _ctx_for(name)
    term = losses.get(name, ctx)
    with pytest.raises(ValueError, match=r"needs \(n, c, h, w\) feature maps; the student has no 4-D layer"):
        term(student_feats=torch.randn(4, 7), teacher_feats=inputs["teacher_feats"].float())
    with pytest.raises(ValueError, match=r"needs \(n, c, h, w\) feature maps; the teacher has no 4-D layer"):
        term(student_feats=inputs["student_feats"].float(), teacher_feats=torch.randn(4, 7))


# ---------------------------------------------------------------- wkd_f

def _wkd_f_oracle(s, t, ratio, grid, eps):
    # JiamingLv/WKD (214cf88) mdistiller/distillers/WKD.py, literally: wkd_feature_loss and
    # adaptive_avg_std_pool2d — per cell [floor(i·H/g), ceil((i+1)·H/g)), mean and sqrt(unbiased var + eps)
    # over the cell's positions, squared differences summed and divided by grid²·n; ratio·mean + cov
    n, c, h, w = s.shape

    def stats(x):
        mean, std = np.zeros((n, c, grid, grid)), np.zeros((n, c, grid, grid))
        for i in range(grid):
            r0, r1 = int(np.floor(i * h / grid)), int(np.ceil((i + 1) * h / grid))
            for j in range(grid):
                c0, c1 = int(np.floor(j * w / grid)), int(np.ceil((j + 1) * w / grid))
                block = x[:, :, r0:r1, c0:c1].reshape(n, c, -1)
                mean[:, :, i, j] = block.mean(-1)
                std[:, :, i, j] = np.sqrt(block.var(-1, ddof=1) + eps)
        return mean, std
    (ms, ss), (mt, st) = stats(s), stats(t)
    return (ratio * np.sum((ms - mt) ** 2) + np.sum((ss - st) ** 2)) / (grid ** 2 * n)


@pytest.mark.parametrize("s_shape,t_shape,options", [
    ((3, 4, 4), (5, 4, 4), {}),                                             # res8x4 → res32x4: 1×1 conv, grid 1
    ((3, 4, 4), (5, 8, 8), dict(mean_cov_ratio=3.0, spatial_grid=4)),       # ShuffleV1 → wrn_40_2: 4×4 ConvT
    ((3, 6, 6), (5, 6, 6), dict(spatial_grid=4, eps=1e-3)),                 # 6/4: overlapping adaptive cells
    ((3, 8, 8), (5, 4, 4), dict(mean_cov_ratio=8.0, spatial_grid=2)),       # 3×3 stride-2 conv
])
def test_wkd_f_matches_the_authors_gaussian_loss(s_shape, t_shape, options):
    torch.manual_seed(0)
    term = losses.get("wkd_f", TermContext(student_shape=s_shape, teacher_shape=t_shape), **options).double()
    conv, bn = term.projector[0], term.projector[1]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    g = _g(7)
    s = torch.randn(3, *s_shape, generator=g, dtype=torch.float64)
    t = torch.randn(3, *t_shape, generator=g, dtype=torch.float64).relu()
    if isinstance(conv, torch.nn.ConvTranspose2d):
        x = F.conv_transpose2d(s, conv.weight, conv.bias, stride=2, padding=1)
    else:
        x = F.conv2d(s, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding)
    o = dict(losses.spec("wkd_f").defaults) | options
    expected = _wkd_f_oracle(_batchnorm_relu(_np(x), bn), _np(t), o["mean_cov_ratio"], o["spatial_grid"], o["eps"])
    assert float(term(student_feats=s, teacher_feats=t)) == pytest.approx(expected, rel=1e-10)


def test_wkd_f_is_the_w2_distance_of_diagonal_gaussians():
    # ratio 1, grid 1: per sample the squared 2-Wasserstein (Bures) distance between N(μ_S, diag σ_S²) and
    # N(μ_T, diag σ_T²), POT's closed form, averaged over the batch
    torch.manual_seed(1)
    term = losses.get("wkd_f", TermContext(student_shape=(4, 5, 5), teacher_shape=(6, 5, 5)), mean_cov_ratio=1.0)
    term = term.double()
    s = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    t = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    p = _np(term.projector(s))
    w2 = []
    for i in range(3):
        ms, mt = p[i].reshape(6, -1).mean(1), _np(t)[i].reshape(6, -1).mean(1)
        cs = np.diag(p[i].reshape(6, -1).var(1, ddof=1) + 1e-5)
        ct = np.diag(_np(t)[i].reshape(6, -1).var(1, ddof=1) + 1e-5)
        w2.append(float(ot.gaussian.bures_wasserstein_distance(ms, mt, cs, ct)) ** 2)
    assert float(term(student_feats=s, teacher_feats=t)) == pytest.approx(np.mean(w2), rel=1e-8)


def test_wkd_f_grid_cells_are_adaptive_pooling_cells():
    # the means of WKD's cells are nn.AdaptiveAvgPool2d's; the stds are sqrt of the unbiased variance
    from kd2m.losses.maps import diagonal_gaussians
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    for grid in (1, 2, 3, 4):
        mean, std = diagonal_gaussians(x, grid, eps=0.0)
        assert torch.allclose(mean, F.adaptive_avg_pool2d(x, grid))
        rows = [(int(np.floor(i * 7 / grid)), int(np.ceil((i + 1) * 7 / grid))) for i in range(grid)]
        cols = [(int(np.floor(j * 6 / grid)), int(np.ceil((j + 1) * 6 / grid))) for j in range(grid)]
        var = [[x[:, :, r0:r1, c0:c1].reshape(2, 3, -1).numpy().var(-1, ddof=1) for c0, c1 in cols]
               for r0, r1 in rows]
        assert np.allclose(_np(std) ** 2, np.moveaxis(np.array(var), (0, 1), (2, 3)))


def test_wkd_f_projectors():
    ctx = TermContext(student_shape=(3, 4, 4), teacher_shape=(5, 4, 4))
    conv1x1 = losses.get("wkd_f", ctx).projector
    assert [type(m) for m in conv1x1] == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU]
    assert conv1x1[0].kernel_size == (1, 1)
    bottleneck = losses.get("wkd_f", ctx, projector="bottleneck").projector  # WKD's ConvRegBottleNeck
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in bottleneck[:3]] == [
        (3, 256, (1, 1)), (256, 256, (3, 3)), (256, 5, (1, 1))]
    assert [type(m) for m in bottleneck[3:]] == [torch.nn.BatchNorm2d, torch.nn.ReLU]
    with pytest.raises(ValueError, match="'wkd_f': no regressor maps a student map of 3×3 onto a teacher map of 8×8"):
        losses.get("wkd_f", TermContext(student_shape=(2, 3, 3), teacher_shape=(4, 8, 8)))
    with pytest.raises(ValueError, match=r"'wkd_f' needs \(n, c, h, w\) feature maps; the teacher has no 4-D"):
        losses.get("wkd_f", TermContext(student_shape=(2, 4, 4), teacher_shape=(16,)))
    term = losses.get("wkd_f", ctx)
    with pytest.raises(ValueError, match=r"projector was built for \(3, 4, 4\)"):
        term(student_feats=torch.randn(2, 3, 5, 5), teacher_feats=torch.randn(2, 5, 4, 4))


# ---------------------------------------------------------------- all terms: gradients, degenerate batches, errors

def _inputs_requiring_grad(name, inputs):
    key = "student_logits" if "student_logits" in inputs else "student_feats"
    return key, inputs[key].clone().requires_grad_(True)


@pytest.mark.parametrize("name", BASELINES)
def test_gradcheck_float64(name):
    ctx, inputs = _ctx_for(name)
    term = _term(name, ctx)
    key, x = _inputs_requiring_grad(name, inputs)
    if name == "crd":
        term.train()
        term(**inputs)  # set Z once; gradcheck then sees a fixed function
        term.eval()
    if name == "rkd":  # smooth-L1 has a kink at |Δ| = 1: keep the relations close, on the smooth side
        inputs = dict(inputs, teacher_feats=inputs["teacher_feats"][:, :4] * 0.3 + x.detach() * 0.7)
    assert torch.autograd.gradcheck(lambda v: term(**dict(inputs, **{key: v})), (x,), eps=1e-6, atol=1e-5)
    if name in ("kd", "dkd"):
        term = _term(name, ctx, standardize=True)
        assert torch.autograd.gradcheck(lambda v: term(**dict(inputs, **{key: v})), (x,), eps=1e-6, atol=1e-5)
    if name in ("crd", "fitnet", "wkd_f"):  # their learnable layers receive gradients too
        term.zero_grad()
        term(**dict(inputs, **{key: x})).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in term.parameters())


def _degenerate_batches(name):
    ctx, inputs = _ctx_for(name)
    key = "student_logits" if "student_logits" in inputs else "student_feats"
    tkey = key.replace("student", "teacher")
    s, t = inputs[key], inputs[tkey]
    yield "identical samples", ctx, dict(inputs, **{key: s[:1].expand_as(s).clone(), tkey: t[:1].expand_as(t).clone()})
    yield "student equals teacher", ctx, dict(inputs, **{key: t.clone()}) if s.shape == t.shape else inputs
    yield "n = 2", ctx, {k: (v[:2] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    if "labels" in inputs:
        yield "one class", ctx, dict(inputs, labels=torch.zeros_like(inputs["labels"]))
    if s.ndim == 4:
        yield "zero maps", ctx, dict(inputs, **{key: torch.zeros_like(s), tkey: torch.zeros_like(t)})


@pytest.mark.parametrize("name", BASELINES)
def test_finite_value_and_gradient_on_degenerate_batches(name):
    for what, ctx, inputs in _degenerate_batches(name):
        term = _term(name, ctx)
        key, x = _inputs_requiring_grad(name, inputs)
        value = term(**dict(inputs, **{key: x}))
        value.backward()
        assert torch.isfinite(value), f"{name}: {what} gives {value}"
        assert torch.isfinite(x.grad).all(), f"{name}: {what} gives a non-finite gradient"


@pytest.mark.parametrize("name", ["kd", "dkd", "dist", "wkd_l"])
def test_logit_terms_refuse_bad_input(name):
    ctx, inputs = _ctx_for(name)
    term = losses.get(name, ctx)
    zs, zt, y = inputs["student_logits"].float(), inputs["teacher_logits"].float(), inputs["labels"]
    with pytest.raises(ValueError, match=f"loss term {name!r} needs student_logits, got None"):
        term(student_logits=None, teacher_logits=zt, labels=y)
    with pytest.raises(ValueError, match=r"student logits \(5, 5\) and teacher logits \(4, 5\) differ"):
        term(student_logits=zs, teacher_logits=zt[:4], labels=y)
    with pytest.raises(ValueError, match=r"needs logits of shape \(n, C\)"):
        term(student_logits=zs[0], teacher_logits=zt[0], labels=y)
    if "labels" in losses.spec(name).needs:
        with pytest.raises(ValueError, match="needs labels, got None"):
            term(student_logits=zs, teacher_logits=zt, labels=None)
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
            term(student_logits=zs, teacher_logits=zt, labels=torch.full((5,), 5))
        with pytest.raises(ValueError, match=r"labels must have shape \(5,\)"):
            term(student_logits=zs, teacher_logits=zt, labels=y[:3])
        with pytest.raises(TypeError, match="labels must be an integer tensor"):
            term(student_logits=zs, teacher_logits=zt, labels=y.float())


@pytest.mark.parametrize("name", ["pkt", "rkd", "crd"])
def test_feature_terms_refuse_bad_input(name):
    ctx, inputs = _ctx_for(name)
    term = losses.get(name, ctx)
    s, t, i = inputs["student_feats"].float(), inputs["teacher_feats"].float(), inputs["index"]
    with pytest.raises(ValueError, match=f"loss term {name!r} needs teacher_feats, got None"):
        term(student_feats=s, teacher_feats=None, index=i)
    with pytest.raises(ValueError, match="student batch n=5 and teacher batch n=4 differ"):
        term(student_feats=s, teacher_feats=t[:4], index=i)
    with pytest.raises(ValueError, match=r"needs pooled features of shape \(n, d\)"):
        term(student_feats=s[:, :, None, None], teacher_feats=t, index=i)


@pytest.mark.parametrize("name,options,match", [
    ("kd", dict(temperature=0.0), "temperature must be a finite number > 0"),
    ("kd", dict(standardize=1), "standardize must be True or False"),
    ("dkd", dict(beta=-1.0), "beta must be a finite number ≥ 0"),
    ("dist", dict(temperature=float("nan")), "temperature must be a finite number > 0"),
    ("pkt", dict(eps=0.0), "eps must be a finite number > 0"),
    ("rkd", dict(squared="no"), "squared must be True or False"),
    ("at", dict(p=-2.0), "p must be a finite number > 0"),
])
def test_bad_option_values_are_refused_by_name(name, options, match):
    ctx, inputs = _ctx_for(name)
    with pytest.raises((ValueError, TypeError), match=match):
        losses.get(name, ctx, **options)(**inputs)


@pytest.mark.parametrize("name,options,match", [
    ("wkd_l", dict(sinkhorn_iter=0), "sinkhorn_iter must be an int ≥ 1"),
    ("wkd_l", dict(sinkhorn_reg=0.0), "sinkhorn_reg must be a finite number > 0"),
    ("wkd_l", dict(target=False, gamma=0.0), "leave nothing to compute"),
    ("wkd_l", dict(target="no"), "target must be True or False"),
    ("wkd_f", dict(spatial_grid=0), "spatial_grid must be an int ≥ 1"),
    ("wkd_f", dict(spatial_grid=4), "cells of one position"),   # 4×4 cells on the 4×4 teacher map
    ("wkd_f", dict(mean_cov_ratio=-1.0), "mean_cov_ratio must be a finite number ≥ 0"),
    ("wkd_f", dict(eps=0.0), "eps must be a finite number > 0"),
    ("wkd_f", dict(projector="mlp"), "projector must be one of conv1x1, bottleneck"),
    ("wkd_f", dict(projector="bottleneck"), "needs student and teacher maps of one size"),
    ("crd", dict(nce_m=1.0), r"nce_m \(memory momentum\) must be in \[0, 1\)"),
    ("crd", dict(feat_dim=0), "feat_dim must be an int ≥ 1"),
])
def test_bad_option_values_are_refused_at_construction(name, options, match):
    ctx, _ = _ctx_for(name)
    with pytest.raises((ValueError, TypeError), match=match):
        losses.get(name, ctx, **options)


@pytest.mark.parametrize("name", BASELINES)
def test_teacher_gets_no_gradient_and_half_inputs_compute_in_float32(name):
    ctx, inputs = _ctx_for(name)
    term = _term(name, ctx, double=False)
    tkey = "teacher_logits" if "teacher_logits" in inputs else "teacher_feats"
    skey = tkey.replace("teacher", "student")
    t = inputs[tkey].float().requires_grad_(True)
    s = inputs[skey].to(torch.bfloat16).requires_grad_(True)
    value = term(**dict(inputs, **{skey: s, tkey: t}))
    value.backward()
    assert value.dtype == torch.float32 and t.grad is None and s.grad is not None
    reference = term(**dict(inputs, **{skey: s.detach().float(), tkey: t.detach()}))
    assert torch.allclose(value, reference, rtol=1e-5, atol=1e-6)
