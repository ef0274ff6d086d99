"""Your own models in the grid: ``--student package.module:factory`` (and ``teacher:`` in YAML).

A factory module written here is imported from the working directory, built with kd2m's
keywords, trained through ``kd2m run``; every way it can be wrong is one line, exit 2, before
anything trains."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from kd2m.models import build_model

FACTORIES = textwrap.dedent("""
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self, num_classes, in_channels, image_size, width=16):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, width), nn.ReLU())
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.head(self.body(x))

    def tiny(num_classes, in_channels, image_size, width=16):
        return Tiny(num_classes, in_channels, image_size, width)

    def not_a_module(num_classes, in_channels, image_size):
        return 3

    NOT_CALLABLE = 7
    """)


@pytest.fixture
def factory_dir(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("my_models", None)


def test_factory_builds_with_kd2m_keywords_and_options(factory_dir):
    net = build_model("my_models:tiny", num_classes=10, in_channels=1, image_size=8, width=24)
    assert type(net).__name__ == "Tiny"
    assert net.feature_dim == 24  # the input width of its last nn.Linear, set because the model has none
    assert net(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_factory_student_trains_through_kd2m_run(factory_dir, tiny_grid):
    out = factory_dir / "run"
    done = subprocess.run([sys.executable, "-m", "kd2m", "run", *tiny_grid, "--student", "my_models:tiny",
                           "--select-k", "none", "--no-diagnostics", "--out", str(out)],
                          cwd=factory_dir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    final = json.loads((out / "cw2" / "seed0" / "final.json").read_text())
    assert final["settings"]["model"] == "my_models:tiny"
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 3  # teacher, CE-only student, CW2 student


@pytest.mark.parametrize("name, says", [
    ("no_such_module:tiny", "cannot import 'no_such_module' (ModuleNotFoundError"),
    ("my_models:absent", "module 'my_models' has no 'absent'"),
    ("my_models:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a callable"),
    ("my_models:not_a_module", "the factory returned 'int', not an nn.Module"),
])
def test_bad_factory_is_one_line_before_training(factory_dir, cli_refuses, name, says):
    out = factory_dir / "bad"
    cli_refuses(["run", "--student", name, "--metrics", "w2", "--baselines", "ce", "--seeds", "1", "--epochs", "1",
                 "--select-k", "none", "--no-progress", "--out", out], says)
    assert not (out / "teacher").exists()  # nothing trained
