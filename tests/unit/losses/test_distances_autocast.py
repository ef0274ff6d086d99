"""Spatial distances under autocast keep their float32 value."""
import pytest
import torch


# 8 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mmd_rbf", "sliced_w2"])
def test_spatial_distances_under_autocast_have_the_float32_value(name):
    """`unit="spatial"` under the caller's bf16 autocast: the batched GEMMs run in float32 (bf16
    moved MMD by 3.6 %); the value and dtype are those computed without autocast."""
    from kd2m import KD2MLoss
    g = torch.Generator().manual_seed(0)
    t = torch.relu(torch.randn(6, 16, 4, 4, generator=g) * 3)
    s = torch.relu(t + 0.3 * torch.randn(6, 16, 4, 4, generator=g))
    loss = KD2MLoss(name, unit="spatial", **({"seed": 0} if name == "sliced_w2" else {}))
    ref = loss(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(s, t)
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(float(ref), rel=1e-6)
