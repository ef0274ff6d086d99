"""The README's loss-in-your-own-loop snippet runs as written and distills: against a CE-only
twin (same initial weights, same batches), it brings the student's features closer to the
teacher's under the snippet's own distance; the "Adding a loss term" example of the extending
page (docs/extending.md) registers a term that trains."""
import copy
import re
from pathlib import Path

import torch
from torch import nn

from kd2m import FeatureTap, metrics

README = Path(__file__).resolve().parents[1] / "README.md"
EXTENDING = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _snippet() -> str:
    return re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)


def _feature_gap(student, teacher, x, y) -> float:
    with FeatureTap(student) as s_tap, FeatureTap(teacher) as t_tap, torch.no_grad():
        student(x), teacher(x)
        return float(metrics.get("cw2")(s_tap.feature, t_tap.feature, y))


def test_readme_snippet_runs_and_distills():
    code = _snippet()
    assert 'KD2MLoss("cw2", weight=1e-4)' in code  # λ raised below: this toy's CE is ~1, its cw2 ~3
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    student = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    twin = copy.deepcopy(student)
    x = torch.randn(96, 6)
    y = teacher(x).argmax(1).detach()
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)] * 20
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    scope = {"student": student, "teacher": teacher, "loader": loader, "opt": opt}
    gap0 = _feature_gap(student, teacher, x, y)
    exec(compile(code.replace("weight=1e-4", "weight=0.5"), "README.md", "exec"), scope)
    assert torch.isfinite(scope["loss"])
    # the CE-only twin: the same loop without the distillation term
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05)
    for xb, yb in loader:
        loss = nn.functional.cross_entropy(twin(xb), yb)
        twin_opt.zero_grad()
        loss.backward()
        twin_opt.step()
    distilled, ce_only = _feature_gap(student, teacher, x, y), _feature_gap(twin, teacher, x, y)
    assert distilled < 0.8 * ce_only and distilled < gap0, (gap0, distilled, ce_only)


def test_readme_adding_a_loss_term_example_registers_and_trains():
    """The "Adding a loss term" example of docs/extending.md, as written, registers a term that `kd2m.losses.get` builds
    and that trains a projector (in a fresh process: registering mutates the registry)."""
    import subprocess
    import sys
    blocks = re.findall(r"```python\n(.*?)```", EXTENDING.read_text(), re.S)
    code = next(b for b in blocks if "@register_term" in b).replace("from .registry import",
                                                                     "from kd2m.losses.registry import")
    check = code + '''
import torch
from kd2m import losses
assert "cos" in losses.available("baseline") and losses.spec("cos").label == "Cosine"
term = losses.get("cos", losses.TermContext(student_shape=(4,), teacher_shape=(3,)), eps=1e-6)
s, t = torch.randn(8, 4, requires_grad=True), torch.randn(8, 3)
value = term(student_feats=s, teacher_feats=t)
value.backward()
assert 0 <= float(value) <= 2 and s.grad.abs().sum() > 0 and term.proj.weight.grad is not None
print("ok")
'''
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
