"""Pins found by a mutation audit: each test fails on one realistic one-line bug that the rest of
the suite let through (each was checked by applying the bug by hand and seeing the test fail).

1. calibration leaking a term's state into training (CRD's Z and memory banks);
2. CRD's momentum weights swapped (invisible at the default nce_m = 0.5);
3. the per-seed teacher-cache memo keyed without the tapped layer;
4. calibration reading cache row ``index`` instead of ``index·K`` with K > 1 views;
5. a tied seed counted as a win;
6. a refused second run cleaning the holder's in-flight temp files;
7. an fsync of an unflushed (empty) file in the atomic writer;
8. ``unit="spatial"`` distances run under the caller's autocast;
9. gradients accumulating across steps (``zero_grad`` forgotten);
10. epochs after the first trained in eval mode (``net.train()`` forgotten).
"""
import os
import subprocess
import sys

import pytest
import torch

from kd2m import losses
from kd2m import results as R
from kd2m.cli import main
from kd2m.config import RunConfig
from kd2m.data import build_dataset
from kd2m.features import FeatureTap
from kd2m.losses import TermContext
from kd2m.train import Trainer, build_student, build_teacher, freeze


def _setup(tmp_path, name="r", **cfg_fields):
    """A set-up Trainer (terms bound, λ calibrated) for the first student of a digits config."""
    cfg = RunConfig(epochs=1, progress=False, diagnostics=False, **cfg_fields).resolved()
    bundle = build_dataset("digits")
    teacher = freeze(build_teacher(cfg, bundle, 0))
    tr = Trainer(build_student(cfg, bundle, 0), bundle, cfg, cfg.methods()[0], 0, tmp_path / name,
                 torch.device("cpu"), teacher=teacher, teacher_caches={})
    tr._setup()
    return tr


# 1 ---------------------------------------------------------------------------------------------
def test_auto_weight_leaves_crds_state_as_a_numeric_twin_has_it(tmp_path):
    """Calibration runs CRD's forward four times: its first call fixes Z and every call moves the
    memory banks. After set-up a `weight: auto` CRD student's term state must equal that of the same
    student with a numeric λ (Z unset, banks as initialised), or calibration leaks into training."""
    opts = {"crd": {"nce_k": 64}}
    auto = _setup(tmp_path, "auto", baselines=["crd"], metrics=[], weights={"crd": "auto"}, term_options=opts)
    fixed = _setup(tmp_path, "fixed", baselines=["crd"], metrics=[], weights={"crd": 0.8}, term_options=opts)
    assert auto.scales[0] > 0 and auto.scales[0] != 1.0  # it did calibrate
    a, b = auto.terms[0].module.state_dict(), fixed.terms[0].module.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert float(a["z_s"]) < 0 and float(a["z_t"]) < 0  # Z is still to be fixed by training's first call


# 2 ---------------------------------------------------------------------------------------------
def test_crd_bank_update_weights_the_old_row_by_the_momentum():
    """RepDistiller's memory update at nce_m = 0.9: m ← normalize(0.9·m + 0.1·v) (the default 0.5
    cannot tell the two weights apart)."""
    g = torch.Generator().manual_seed(3)
    ctx = TermContext(student_shape=(4,), teacher_shape=(6,), num_data=20, train_labels=torch.arange(20) % 3)
    term = losses.get("crd", ctx, feat_dim=8, nce_k=3, nce_m=0.9).double()
    s = torch.randn(5, 4, generator=g, dtype=torch.float64)
    t = torch.randn(5, 6, generator=g, dtype=torch.float64)
    index = torch.tensor([0, 3, 7, 9, 12])
    before = (term.memory_s.clone(), term.memory_t.clone())
    with torch.no_grad():
        v_s = torch.nn.functional.normalize(term.embed_s(s), dim=1)
        v_t = torch.nn.functional.normalize(term.embed_t(t), dim=1)
    term(student_feats=s, teacher_feats=t, index=index)
    for bank, old, v in ((term.memory_s, before[0], v_s), (term.memory_t, before[1], v_t)):
        moved = 0.9 * old[index] + 0.1 * v
        torch.testing.assert_close(bank[index], moved / moved.norm(dim=1, keepdim=True), rtol=1e-12, atol=1e-14)


# 3 ---------------------------------------------------------------------------------------------
def test_cached_students_reading_other_teacher_layers_get_their_own_tables(tmp_path):
    """Two cached students of one seed share the seed's memo of teacher tables; one reads the
    teacher's penultimate features, the other `features.12` (the pre-ReLU Linear output, also 64-d).
    Each must get a table of its own layer's features."""
    bundle = build_dataset("digits")
    memo = {}
    tables = {}
    for layer in ("penultimate", "features.12"):
        cfg = RunConfig(metrics=["w2"], baselines=[], epochs=1, progress=False, diagnostics=False,
                        teacher_layer=layer, teacher_cache=1).resolved()
        teacher = memo.setdefault("teacher", freeze(build_teacher(cfg, bundle, 0)))
        tr = Trainer(build_student(cfg, bundle, 0), bundle, cfg, cfg.methods()[0], 0, tmp_path / layer,
                     torch.device("cpu"), teacher=teacher, teacher_caches=memo)
        tr._setup()
        tables[layer] = tr.teacher_out.cache.features
    x = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))])
    with torch.no_grad(), FeatureTap(teacher, ["penultimate", "features.12"]) as tap:
        teacher(x)
    for layer, table in tables.items():
        torch.testing.assert_close(table, tap.features[layer], rtol=1e-5, atol=1e-5)
    assert not torch.equal(tables["penultimate"], tables["features.12"])


# 4 ---------------------------------------------------------------------------------------------
def test_calibration_reads_view_zero_of_each_image_from_a_multi_view_cache(tmp_path):
    """Without augmentation every view of an image is the image itself, so `teacher_cache: 2`
    must calibrate exactly the λ of `teacher_cache: 1` (row index·K is view 0 of image index)."""
    scales = []
    for k in (1, 2):
        tr = _setup(tmp_path, f"k{k}", metrics=["cw2", "gauss_w2"], baselines=[], weight="auto", teacher_cache=k)
        scales.append(tr.scales)
    assert scales[0] == scales[1]


# 5 ---------------------------------------------------------------------------------------------
def test_a_tied_seed_is_not_a_win():
    """Δ = [0, +2, −1] points: one win in three seeds, in summary.csv's numbers and the table."""
    rows = [{"dataset": "x", "method": m, "seed": s, "test_acc": a, "weight": 0.0}
            for m, accs in {"ce": [0.50, 0.50, 0.50], "kd": [0.50, 0.52, 0.49]}.items() for s, a in enumerate(accs)]
    (kd,) = [s for s in R.summarize(rows) if s["method"] == "kd"]
    assert kd["wins"] == 1 and kd["n_pairs"] == 3
    line = [ln for ln in R.markdown_table(rows, "x").splitlines() if ln.startswith("| KD |")][0]
    assert "| 1/3 |" in line


# 6 ---------------------------------------------------------------------------------------------
HOLD = """
import sys, time
from kd2m.rundir import RunDir
with RunDir(sys.argv[1]).locked():
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_refused_run_leaves_the_holders_temp_files_alone(tmp_path, capsys):
    """A second `kd2m run` into a busy directory is refused (exit 2) without touching it: the temp
    file of the holder's write in flight is still there (temp files are cleaned only under the lock)."""
    out = tmp_path / "busy"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout.readline().strip() == "locked"
        tmp = out / "ce" / "seed0" / ".final.json.abcd1234.tmp"
        tmp.parent.mkdir(parents=True)
        tmp.write_text("{half a write")
        code = main(["run", "--out", str(out), "--epochs", "1", "--teacher-epochs", "1", "--seeds", "0,",
                     "--baselines", "ce", "--metrics", "", "--no-progress"])
        assert code == 2
        assert "is in use by pid" in capsys.readouterr().err
        assert tmp.read_text() == "{half a write"
    finally:
        proc.kill()
        proc.wait(timeout=30)


# 7 ---------------------------------------------------------------------------------------------
def test_the_atomic_writer_flushes_before_it_fsyncs(tmp_path, monkeypatch):
    """At the fsync of the temp file, the file on disk already holds every byte (a small write
    stays in Python's buffer until flushed: an fsync before the flush makes an empty file durable)."""
    import kd2m.atomic_io as aio
    sizes = []
    real_fsync = os.fsync

    def spy(fd):
        sizes.append(os.fstat(fd).st_size)
        return real_fsync(fd)
    monkeypatch.setattr(aio.os, "fsync", spy)
    data = b"x" * 1000  # far below the 8 KiB buffer
    aio.atomic_write_bytes(tmp_path / "f.bin", data)
    assert sizes and sizes[0] == len(data)
    assert (tmp_path / "f.bin").read_bytes() == data


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


# 9, 10 -----------------------------------------------------------------------------------------
def _spy_backward(monkeypatch, record):
    real = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        record()
        return real(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "backward", backward)


def _fit(tmp_path, epochs=2, **cfg_fields):
    cfg = RunConfig(epochs=epochs, progress=False, diagnostics=False, metrics=["gauss_w2"], baselines=[],
                    **cfg_fields).resolved()
    bundle = build_dataset("digits")
    student = build_student(cfg, bundle, 0)
    teacher = freeze(build_teacher(cfg, bundle, 0))
    tr = Trainer(student, bundle, cfg, cfg.methods()[0], 0, tmp_path / "r", torch.device("cpu"), teacher=teacher)
    return tr, student


def test_every_step_starts_with_no_gradient_left_from_the_last(tmp_path, monkeypatch):
    tr, student = _fit(tmp_path)
    leftovers = []

    def record():
        leftovers.append(sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None))
    _spy_backward(monkeypatch, record)
    tr.fit()
    steps = 2 * -(-len(tr.bundle.train) // tr.cfg.batch_size)
    assert len(leftovers) == steps
    assert leftovers == [0.0] * steps


def test_every_epochs_steps_run_with_the_student_in_train_mode(tmp_path, monkeypatch):
    """The test-set evaluation at the end of an epoch puts the student in eval mode; the next
    epoch's steps must train it in train mode again (dropout on, batch-norm statistics updated)."""
    tr, student = _fit(tmp_path, epochs=3)
    modes = []
    _spy_backward(monkeypatch, lambda: modes.append(student.training))
    tr.fit()
    steps = -(-len(tr.bundle.train) // tr.cfg.batch_size)
    assert len(modes) == 3 * steps and all(modes)
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in student.modules())  # the mode matters here
