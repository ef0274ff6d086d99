"""The README's loss-in-your-own-loop snippet runs as written and trains."""
import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_snippet_runs_and_distills():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    student = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(96, 6)
    y = teacher(x).argmax(1).detach()
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)] * 5
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    scope = {"student": student, "teacher": teacher, "loader": loader, "opt": opt}
    before = [p.detach().clone() for p in student.parameters()]
    exec(compile(code, "README.md", "exec"), scope)
    assert torch.isfinite(scope["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
