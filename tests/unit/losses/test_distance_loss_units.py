"""Units of "sample" in KD2MLoss: spatial (per-image distributions of positions/tokens), class, and
the projectors between students and teachers of different widths and grids."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd2m import KD2MLoss, losses, metrics
from kd2m.losses import TermContext
from kd2m.metrics.batched import is_batched
from kd2m.projectors import MapProjector

from helpers import load_benchmark


def _maps(n=3, c=5, h=3, w=4, seed=0, shift=0.7, teacher_hw=None):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    th, tw = teacher_hw or (h, w)
    t = 1.5 * torch.randn(n, c, th, tw, generator=g, dtype=torch.float64) + shift
    return s, t


def _per_image(name, s, t, **options):
    """The oracle: metrics.get(name) between image i's (h·w, c) student and teacher samples, averaged."""
    m = metrics.get(name, **options)
    pos = lambda x, i: x[i].flatten(1).T.contiguous() if x.dim() == 4 else x[i]  # noqa: E731
    return torch.stack([m(pos(s, i), pos(t, i)) for i in range(s.shape[0])]).mean()


CASES = [
    ("gauss_w2", {}),
    ("gauss_w2", {"diagonal": True}),
    ("gauss_w2", {"ridge": 1e-3}),
    ("gauss_kl", {}),
    ("gauss_kl", {"diagonal": True}),
    ("mmd_rbf", {}),
    ("mmd_rbf", {"bandwidth": 2.0, "multipliers": (0.5, 1.0, 2.0), "unbiased": True}),
    ("mmd_linear", {}),
    ("sliced_w2", {"n_projections": 16, "seed": 4}),
    ("w2", {}),
    ("sinkhorn", {"eps": 0.5}),
    ("gw2", {}),
]


@pytest.mark.parametrize("name, options", CASES)
@pytest.mark.parametrize("c, teacher_hw", [(5, None), (24, (2, 3))])  # 24 channels: the low-rank Gaussian route
def test_spatial_unit_equals_per_image_loop(name, options, c, teacher_hw):
    s, t = _maps(c=c, teacher_hw=teacher_hw)
    value = KD2MLoss(name, unit="spatial", **options)(s, t)
    (grad,) = torch.autograd.grad(value, s)
    s2 = s.detach().clone().requires_grad_(True)
    expected = _per_image(name, s2, t, **options)
    (expected_grad,) = torch.autograd.grad(expected, s2)
    assert value.dtype == torch.float64
    assert torch.allclose(value, expected, rtol=1e-10, atol=1e-12)
    # relative to the gradient's scale: gauss_kl with 6 teacher samples in 24 dims is ridge-dominated
    # (value ~1e6, condition ~1/ρ), where entries of different size share round-off
    assert torch.allclose(grad, expected_grad, rtol=1e-8, atol=1e-10 * float(expected_grad.abs().max()))


@pytest.mark.parametrize("name", ["gauss_w2", "gauss_kl", "mmd_rbf", "sliced_w2", "mmd_linear"])
def test_spatial_unit_is_batched_not_a_loop(name, monkeypatch):
    # the per-set metric must not be called once per image: make it fail if it is
    assert is_batched(name)
    monkeypatch.setattr(metrics._base.Metric, "__call__", lambda *a, **k: pytest.fail("looped over images"))
    s, t = _maps()
    assert torch.isfinite(KD2MLoss(name, unit="spatial")(s, t))


def test_spatial_unit_on_tokens_equals_per_image_loop():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 7, 6, generator=g, dtype=torch.float64)  # different token counts are fine
    for name in ("gauss_w2", "mmd_rbf"):
        assert torch.allclose(KD2MLoss(name, unit="spatial")(s, t), _per_image(name, s, t), rtol=1e-10)


def test_spatial_gauss_w2_gradcheck():
    s, t = _maps(n=2, c=3, h=3, w=3)
    for diagonal in (False, True):
        loss = KD2MLoss("gauss_w2", unit="spatial", diagonal=diagonal)
        assert torch.autograd.gradcheck(lambda x: loss(x, t), (s,), eps=1e-6, atol=1e-6)  # noqa: B023


def _wkd_feature_loss(f_s, f_t, eps=1e-5, mean_cov_ratio=4.0):
    """WKD-F (Lv et al., NeurIPS 2024), grid = 1, re-derived from wkd_feature_loss in the authors'
    mdistiller/distillers/WKD.py: per image and channel, the mean and sqrt(unbiased variance + eps)
    over the h·w positions; squared differences summed (F.mse_loss reduction='sum') and divided
    by the batch size; loss = MEAN_COV_RATIO · mean_loss + cov_loss."""
    mu_s, mu_t = f_s.mean(dim=(-1, -2)), f_t.mean(dim=(-1, -2))
    sd_s = torch.sqrt(f_s.var(dim=(-1, -2)) + eps)   # torch.var: unbiased (divides by h·w − 1)
    sd_t = torch.sqrt(f_t.var(dim=(-1, -2)) + eps)
    mean_loss = ((mu_s - mu_t) ** 2).sum() / f_s.size(0)
    cov_loss = ((sd_s - sd_t) ** 2).sum() / f_s.size(0)
    return mean_cov_ratio * mean_loss + cov_loss


@pytest.mark.parametrize("ratio", [4.0, 2.0])  # the authors' CIFAR-100 and ImageNet settings
def test_spatial_diagonal_gauss_w2_is_wkd_f(ratio):
    s, t = _maps(n=4, c=6, h=4, w=4)
    ours = KD2MLoss("gauss_w2", unit="spatial", diagonal=True, mean_weight=ratio, correction=1, abs_ridge=1e-5)
    value = ours(s, t)
    (grad,) = torch.autograd.grad(value, s)
    s2 = s.detach().clone().requires_grad_(True)
    theirs = _wkd_feature_loss(s2, t, mean_cov_ratio=ratio)
    (their_grad,) = torch.autograd.grad(theirs, s2)
    assert torch.allclose(value, theirs, rtol=1e-12)
    assert torch.allclose(grad, their_grad, rtol=1e-10, atol=1e-14)
    # and with the default conventions it differs (biased variance, relative ridge, weight 1)
    assert not torch.allclose(KD2MLoss("gauss_w2", unit="spatial", diagonal=True)(s, t), theirs, rtol=1e-3)


def test_wkd_options_belong_to_spatial_gauss_w2():
    with pytest.raises(ValueError, match="mean_weight are options of unit='spatial'"):
        KD2MLoss("gauss_w2", mean_weight=2.0)
    with pytest.raises(ValueError, match="metric 'mmd_rbf' has no option"):
        KD2MLoss("mmd_rbf", unit="spatial", mean_weight=2.0)
    with pytest.raises(ValueError, match="correction must be 0"):
        KD2MLoss("gauss_w2", unit="spatial", correction=2)(*_maps())


@pytest.mark.parametrize("name, plain", [("cw2", "w2"), ("gauss_cw2", "gauss_w2"), ("cmmd_rbf", "mmd_rbf"),
                                         ("jw2", "w2")])
def test_spatial_refuses_class_conditional_metrics(name, plain):
    with pytest.raises(ValueError, match=f"{name} is class-conditional .*use '{plain}'"):
        KD2MLoss(name, unit="spatial")


def test_spatial_needs_maps_or_tokens():
    with pytest.raises(ValueError, match=r"unit='spatial' needs student_feats as maps .*got \(4, 5\).*pool='none'"):
        KD2MLoss("gauss_w2", unit="spatial")(torch.randn(4, 5), torch.randn(4, 5))
    with pytest.raises(ValueError, match="pairs images: student has n=2, teacher n=3"):
        KD2MLoss("gauss_w2", unit="spatial")(torch.randn(2, 5, 2, 2), torch.randn(3, 5, 2, 2))
    with pytest.raises(ValueError, match="feature dims differ"):
        KD2MLoss("gauss_w2", unit="spatial")(torch.randn(2, 5, 2, 2), torch.randn(2, 6, 2, 2))


def test_unit_class_is_the_class_conditional_metrics():
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(12, 4, generator=g), torch.randn(12, 4, generator=g), torch.arange(12) % 3
    assert torch.equal(KD2MLoss("cw2", unit="class")(s, t, y), KD2MLoss("cw2")(s, t, y))
    with pytest.raises(ValueError, match="unit='class' needs a class-conditional metric .*'w2' is not one"):
        KD2MLoss("w2", unit="class")
    with pytest.raises(ValueError, match="unit must be one of batch, spatial, sequence, tokens, class"):
        KD2MLoss("w2", unit="pixel")


# --- projectors ---

def test_map_projector_downsizes_by_average_pooling_then_1x1_conv_bn():
    loss = KD2MLoss("gauss_w2", unit="spatial", student_shape=(4, 8, 8), teacher_shape=(6, 4, 4))
    p = loss.projector
    assert isinstance(p, MapProjector) and p.size == (4, 4) and p.conv.weight.shape == (6, 4, 1, 1)
    x = torch.randn(3, 4, 8, 8)
    p.eval()
    pooled = x.reshape(3, 4, 4, 2, 4, 2).mean((3, 5))  # 2×2 block means
    assert torch.allclose(p(x), p.bn(p.conv(pooled)), atol=1e-6)
    # the projector is learnable through the loss
    p.train()
    loss(torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4)).backward()
    assert p.conv.weight.grad is not None and p.conv.weight.grad.abs().sum() > 0


def test_map_projector_upsizes_bilinearly_and_keeps_equal_channels():
    p = KD2MLoss("mmd_rbf", unit="spatial", student_shape=(4, 2, 2), teacher_shape=(4, 4, 4)).projector
    assert p.conv is None
    x = torch.randn(2, 4, 2, 2)
    assert torch.equal(p(x), F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False))
    assert KD2MLoss("mmd_rbf", unit="spatial", student_shape=(4, 4, 4), teacher_shape=(4, 4, 4)).projector is None


def test_spatial_resize_makes_the_loss_that_of_the_pooled_student():
    s, t = _maps(c=3, h=4, w=6, teacher_hw=(2, 3))
    loss = KD2MLoss("gauss_w2", unit="spatial", student_shape=(3, 4, 6), teacher_shape=(3, 2, 3))
    assert torch.allclose(loss(s, t), _per_image("gauss_w2", F.adaptive_avg_pool2d(s, (2, 3)), t), rtol=1e-10)


def test_tokens_against_a_map_drop_the_class_token_and_project_channels():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 17, 8, generator=g, dtype=torch.float64)       # ViT teacher: 1 + 4×4 tokens
    cmap = torch.randn(2, 8, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    value = KD2MLoss("gauss_w2", unit="spatial")(cmap, tokens)
    assert torch.allclose(value, _per_image("gauss_w2", cmap, tokens[:, 1:]), rtol=1e-10)
    # 16 tokens (no class token): all kept
    assert torch.allclose(KD2MLoss("w2", unit="spatial")(cmap, tokens[:, 1:]),
                          _per_image("w2", cmap, tokens[:, 1:]), rtol=1e-10)
    # widths differ: map student → 1×1 conv + BN, no resize; token student → Linear on every token
    p = KD2MLoss("gauss_w2", unit="spatial", student_shape=(5, 4, 4), teacher_shape=(17, 8)).projector
    assert isinstance(p, MapProjector) and p.size is None and p.conv.out_channels == 8
    p = KD2MLoss("gauss_w2", unit="spatial", student_shape=(17, 12), teacher_shape=(8, 4, 4)).projector
    assert isinstance(p, nn.Linear) and p.weight.shape == (8, 12)


def test_batch_unit_projects_pooled_widths_and_gw2_needs_none():
    p = KD2MLoss("w2", student_shape=(64, 4, 4), teacher_shape=(512, 2, 2)).projector
    assert isinstance(p, nn.Linear) and p.weight.shape == (512, 64)  # pooled features: channel widths
    assert KD2MLoss("w2", student_shape=(17, 32), teacher_shape=(64,)).projector.weight.shape == (64, 32)
    assert KD2MLoss("gw2", unit="spatial", student_shape=(4, 8, 8), teacher_shape=(6, 4, 4)).projector is None
    with pytest.raises(ValueError, match=r"needs per-position features, but the student shape is \(64,\)"):
        KD2MLoss("w2", unit="spatial", student_shape=(64,), teacher_shape=(6, 4, 4))


def test_metric_term_takes_unit_and_reads_maps():
    ctx = TermContext(student_shape=(4, 4, 4), teacher_shape=(8, 2, 2))
    term = losses.get("gauss_w2", ctx, unit="spatial", diagonal=True)
    assert "maps" in term.needs and "feats" not in term.needs and term.unit == "spatial"
    assert isinstance(term.projector, MapProjector)
    s, t = torch.randn(3, 4, 4, 4), torch.randn(3, 8, 2, 2)
    term.eval()
    expected = KD2MLoss("gauss_w2", unit="spatial", diagonal=True)(term.projector(s), t)
    assert torch.allclose(term(student_feats=s, teacher_feats=t), expected)
    assert losses.get("w2").needs == losses.spec("w2").needs
    assert "unit" in losses.spec("mmd_rbf").options and "mean_weight" in losses.spec("gauss_w2").options


def test_spatial_benchmark_child_measures_both_modes():
    bench = load_benchmark("spatial")  # benchmarks/ on sys.path, as the script has it, whatever ran before
    for mode in ("batched", "loop"):
        row = bench.child("gauss_w2", {"diagonal": True}, mode, n=3, c=4, h=2, w=2, repeats=1)
        assert row["seconds"] > 0 and row["peak_mib"] >= 0


def test_unit_tokens_is_the_metric_on_the_batchs_positions_subsampled_by_a_fixed_seeded_choice():
    """unit="tokens": every position of every sample in one distribution; above max_tokens a fixed
    seeded subset of positions (the same every call); labels per position or per sample."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 6, 3, generator=g, dtype=torch.float64), torch.randn(4, 6, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    small = KD2MLoss("cw2", 1.0, unit="tokens")
    assert torch.allclose(small(s, t, y), metrics.get("cw2")(s.reshape(24, 3), t.reshape(24, 3), y))
    capped = KD2MLoss("gauss_w2", 1.0, unit="tokens", max_tokens=10, token_seed=3)
    idx = torch.randperm(24, generator=torch.Generator().manual_seed(3))[:10].sort().values
    want = metrics.get("gauss_w2")(s.reshape(24, 3)[idx], t.reshape(24, 3)[idx])
    assert torch.allclose(capped(s, t), want) and torch.equal(capped(s, t), capped(s, t))
    per_sample = torch.tensor([0, 1, 0, 2])                              # each position takes its sample's label
    assert torch.allclose(small(s, t, per_sample), small(s, t, per_sample.repeat_interleave(6)))
    maps = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)      # a map's positions count too
    assert torch.allclose(KD2MLoss("w2", 1.0, unit="tokens")(maps, maps * 2),
                          metrics.get("w2")(maps.flatten(2).transpose(1, 2).reshape(8, 3),
                                            (2 * maps).flatten(2).transpose(1, 2).reshape(8, 3)))
    with pytest.raises(ValueError, match="unit='tokens' needs student_feats as maps .* or tokens"):
        small(s.reshape(24, 3), t.reshape(24, 3))
    assert torch.allclose(KD2MLoss("gauss_w2", 1.0, unit="sequence")(s, t), KD2MLoss("gauss_w2", 1.0, unit="spatial")(s, t))
