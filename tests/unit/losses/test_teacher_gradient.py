"""The logit terms never send gradient into the teacher."""
import pytest
import torch

from kd2m import losses


@pytest.mark.parametrize("name", ["kd", "dkd", "dist"])
def test_logit_terms_never_send_gradient_into_the_teacher(name):
    zs = torch.randn(8, 5, requires_grad=True)
    zt = torch.randn(8, 5, requires_grad=True)
    y = torch.arange(8) % 5
    v = losses.get(name)(student_logits=zs, teacher_logits=zt, labels=y)
    v.backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zt.grad is None or float(zt.grad.abs().sum()) == 0.0
