"""Models and weights that cannot work are refused before any teacher or student trains."""
import pytest
import torch

from kd2m import metrics
from kd2m.errors import ConfigError

from helpers import ONE_EPOCH_GRID, one_line_error, run_cli


def test_a_model_with_tuple_outputs_or_a_too_small_input_is_refused_before_training():
    from kd2m.harness.preflight import check_training_forward

    class Aux(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            out = self.fc(x)
            return (out, out) if self.training else out

    class Small(torch.nn.Module):
        def forward(self, x):
            raise ValueError("input too small")
    x = torch.randn(4, 4)
    check_training_forward(torch.nn.Linear(4, 3), x, 3, "student", "lin")
    with pytest.raises(ConfigError, match="student aux: returns a tuple.*train mode.*aux_logits"):
        check_training_forward(Aux(), x, 3, "student", "aux")
    with pytest.raises(ConfigError, match=r"teacher small: fails .* \(input too small\)"):
        check_training_forward(Small(), x, 3, "teacher", "small")


def test_torchvision_googlenet_is_refused_before_the_teacher_trains(tmp_path, capsys):
    code, _, err = run_cli(["run", *ONE_EPOCH_GRID, "--student", "torchvision:googlenet", "--baselines", "ce", "--metrics", "",
                            "--out", tmp_path / "o"], capsys)
    one_line_error(code, err, "student torchvision:googlenet")
    assert not (tmp_path / "o" / "teacher").exists()


@pytest.mark.parametrize("factor, needle", [(0.0, "its gradient on the initial student is 0"),
                                            (1e-12, "the term is flat at initialisation")])
def test_weight_auto_with_a_vanishing_gradient_is_refused_before_any_student_trains(tmp_path, capsys, monkeypatch,
                                                                                   factor, needle):
    real = metrics.Metric.__call__

    def flat(self, *args, **kwargs):
        return real(self, *args, **kwargs) * factor
    monkeypatch.setattr(metrics.Metric, "__call__", flat)
    out = tmp_path / "o"
    code, _, err = run_cli(["run", *ONE_EPOCH_GRID, "--baselines", "ce", "--metrics", "w2", "--weight", "auto*1", "--out", out],
                           capsys)
    one_line_error(code, err, "w2: weight auto", needle)
    assert not (out / "ce/seed0/final.json").exists()        # the CE-only student, first in line, never trained
