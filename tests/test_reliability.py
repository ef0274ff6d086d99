"""Bad inputs and hostile conditions: every one ends in a clear one-line error or a documented safe behaviour.

CLI failures: ``kd2m.cli.main`` returns a non-zero code and stderr is the single line
``kd2m: error: …`` naming the problem (no traceback). Library failures: a ValueError/TypeError
naming it. Kept to tiny digits runs (one CPU core is enough).
"""
import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import kd2m.atomic_io as ckpt_mod
from kd2m import metrics
from kd2m import results as R
from kd2m.atomic_io import atomic_write_bytes, load_checkpoint, save_checkpoint
from kd2m.cli import main
from kd2m.loss import KD2MLoss
from kd2m.metrics.memory import pairwise_bytes

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
#: the smallest grid that still trains a teacher and a distilled student
TINY = ["--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--baselines", "ce", "--metrics", "cw2",
        "--no-progress"]
ALL = metrics.available()
CLASS_CONDITIONAL = [m for m in ALL if metrics.spec(m).needs_labels]
SAME_DIM = [m for m in ALL if metrics.spec(m).same_dim]


def kd2m_cmd(*args):
    return [sys.executable, "-m", "kd2m", *args]


def one_line_error(code, err, *needles):
    """``code`` ≠ 0 and ``err`` is exactly one ``kd2m: error:`` line containing every needle."""
    assert code != 0
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("kd2m: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- fixtures of bad files
def _evil_pickle(path, marker):
    """A torch file whose unpickling would run ``touch marker`` (if loaded with weights_only=False)."""
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"model": Evil()}, path)


def _random_bytes(path):
    path.write_bytes(os.urandom(4096))


def _wrong_arch(path):
    from kd2m.models import build_model
    torch.save(build_model("digits_mlp", 10, 1, 8).state_dict(), path)  # a student's weights, not a teacher's


# ----------------------------------------------------------------------------- the table of bad CLI inputs
def _yaml(tmp, text):
    p = tmp / "c.yaml"
    p.write_text(text)
    return ["bench", p]


def _alias_bomb(levels, width, key="seeds"):
    """A YAML list whose aliases nest ``levels`` deep, ``width`` wide: ``width**levels`` leaves."""
    names = "abcdefghijklmnop"
    items = [f"&a [{', '.join(['x'] * width)}]"]
    items += [f"&{names[i]} [{', '.join([f'*{names[i - 1]}'] * width)}]" for i in range(1, levels)]
    return f"{key}: [{', '.join(items)}]\n"


def _file_in_the_way(tmp):
    (tmp / "afile").write_text("x")
    return tmp / "afile" / "sub"


BAD_CLI = [
    # (id, argv builder (tmp, out) -> list, needles in the error line)
    ("unknown-metric", lambda tmp, out: ["run", "--metrics", "w2,wasserstein", "--out", out],
     ["'wasserstein'", "available:", "cw2", "sliced_w2", "gauss_kl"]),
    ("unknown-dataset", lambda tmp, out: ["run", "--dataset", "mnist", "--out", out],
     ["'mnist'", "available:", "digits", "cifar10", "svhn"]),
    ("unknown-teacher", lambda tmp, out: ["run", "--teacher", "resnet9000", "--out", out, *TINY],
     ["teacher", "'resnet9000'", "available:", "digits_cnn", "cifar_resnet34"]),
    ("unknown-student", lambda tmp, out: ["run", "--student", "mlp9", "--out", out, *TINY],
     ["student", "'mlp9'", "available:", "digits_mlp"]),
    ("unknown-baseline", lambda tmp, out: ["run", "--baselines", "ce,fitnets", "--out", out],
     ["fitnets", "ce, kd, dkd"]),
    ("unknown-metric-option", lambda tmp, out: _yaml(tmp, f"out: {out}\nmetrics: [sinkhorn]\n"
                                                      "metric_options: {sinkhorn: {epsilon: 0.1}}\n"),
     ["sinkhorn", "epsilon", "eps"]),
    ("missing-dataset", lambda tmp, out: ["run", "--dataset", "cifar10", "--data-root", tmp / "EMPTY_DIR",
                                          "--out", out], ["EMPTY_DIR", "--download"]),
    ("missing-imagefolder-root", lambda tmp, out: ["run", "--dataset", "imagefolder", "--out", out],
     ["imagefolder", "--data-root"]),
    ("out-in-proc", lambda tmp, out: ["run", "--out", "/proc/forbidden", *TINY], ["/proc/forbidden"]),
    ("out-under-a-file", lambda tmp, out: ["run", "--out", _file_in_the_way(tmp), *TINY], ["afile"]),
    ("yaml-unknown-key", lambda tmp, out: _yaml(tmp, f"out: {out}\nepochz: 3\n"), ["'epochz'", "valid keys"]),
    ("yaml-bad-type", lambda tmp, out: _yaml(tmp, f"out: {out}\nepochs: three\n"), ["epochs", "int", "'three'"]),
    ("yaml-bad-list", lambda tmp, out: _yaml(tmp, f"out: {out}\nmetrics: 5\n"), ["metrics"]),
    ("yaml-bad-seeds", lambda tmp, out: _yaml(tmp, f"out: {out}\nseeds: [a, b]\n"), ["seeds"]),
    ("yaml-not-a-mapping", lambda tmp, out: _yaml(tmp, "- w2\n- cw2\n"), ["c.yaml", "mapping"]),
    ("yaml-invalid", lambda tmp, out: _yaml(tmp, "epochs: [1, 2\n"), ["c.yaml", "not valid YAML"]),
    ("yaml-missing", lambda tmp, out: ["bench", tmp / "nope.yaml"], ["nope.yaml", "does not exist"]),
    ("yaml-alias-bomb", lambda tmp, out: _yaml(tmp, f"out: {out}\n" + _alias_bomb(4, 12, "epochs")),
     ["c.yaml", "aliases", "more than 10000 values", "write the values out"]),
    ("yaml-recursive-alias", lambda tmp, out: _yaml(tmp, f"out: {out}\nseeds: &s [1, *s]\n"),
     ["c.yaml", "recursive"]),
    ("yaml-too-deep", lambda tmp, out: _yaml(tmp, "epochs: " + "[" * 20000 + "]" * 20000 + "\n"),
     ["c.yaml", "nested too deeply"]),
    ("yaml-seeds-bool", lambda tmp, out: _yaml(tmp, f"out: {out}\nseeds: [true]\n"), ["seeds", "integers", "True"]),
    ("nan-weight", lambda tmp, out: ["run", "--weight", "nan", "--out", out], ["weight", "nan"]),
    ("negative-lambda", lambda tmp, out: ["run", "--weight", "-1", "--out", out], ["weight", "-1"]),
    ("zero-epochs", lambda tmp, out: ["run", "--epochs", "0", "--out", out], ["epochs", "≥ 1"]),
    ("negative-teacher-cache", lambda tmp, out: ["run", "--teacher-cache", "-2", "--out", out], ["teacher_cache", "≥ 0"]),
    ("teacher-cache-too-big", lambda tmp, out: ["run", "--teacher-cache", "4", "--max-cache-mb", "0.5", "--out", out,
                                                *TINY],
     ["teacher_cache", "4 view(s) of 1437 items", "MiB", "--max-cache-mb 0.5", "teacher_cache: 0"]),
    ("bad-sweep", lambda tmp, out: ["bench", "--sweep", "weight=big", "--out", out, *TINY], ["--sweep", "big"]),
    ("teacher-random-bytes", lambda tmp, out: ["run", "--pretrained-teacher", tmp / "rand.pt", "--out", out, *TINY],
     ["rand.pt"]),
    ("teacher-wrong-arch", lambda tmp, out: ["run", "--pretrained-teacher", tmp / "mlp.pt", "--out", out, *TINY],
     ["mlp.pt", "do not fit", "DigitsCNN"]),
    ("teacher-missing-file", lambda tmp, out: ["run", "--pretrained-teacher", tmp / "gone.pt", "--out", out, *TINY],
     ["gone.pt", "do not exist"]),
]


@pytest.mark.parametrize("argv, needles", [pytest.param(a, n, id=i) for i, a, n in BAD_CLI])
def test_bad_cli_input_is_one_clear_line(tmp_path, capsys, argv, needles):
    (tmp_path / "EMPTY_DIR").mkdir()
    _random_bytes(tmp_path / "rand.pt")
    _wrong_arch(tmp_path / "mlp.pt")
    out = tmp_path / "out"
    code, _, err = run_cli(argv(tmp_path, out), capsys)
    one_line_error(code, err, *needles)


@pytest.mark.parametrize("argv", [["--dataset", "mnist"], ["--teacher", "nope"], ["--metrics", "nope"]],
                         ids=["dataset", "model", "metric"])
def test_unknown_names_are_refused_before_anything_is_written(tmp_path, capsys, argv):
    out = tmp_path / "out"
    code, _, err = run_cli(["run", *argv, "--out", out], capsys)
    one_line_error(code, err, "nope" if "nope" in argv else "mnist")
    assert not out.exists()


def test_pairwise_memory_refusal_is_fast_and_suggests_linear_metrics(tmp_path, capsys, monkeypatch):
    import kd2m.grid

    def no_data(*a, **k):
        raise AssertionError("the dataset was loaded before the memory check")
    monkeypatch.setattr(kd2m.grid, "build_dataset", no_data)
    t0 = time.perf_counter()
    code, _, err = run_cli(["run", "--metrics", "w2", "--batch-size", "4096", "--max-pairwise-mb", "100",
                            "--out", tmp_path / "o", "--no-progress"], capsys)
    assert time.perf_counter() - t0 < 10
    line = one_line_error(code, err, "'w2'", "n=4096", "MiB", "--max-pairwise-mb", "sliced_w2", "gauss_w2",
                          "gauss_kl", "sinkhorn")
    assert "no lighter" in line  # sinkhorn is O(n²) here too: not offered as the way out
    assert not (tmp_path / "o" / "teacher").exists()


def test_pairwise_model_covers_every_quadratic_metric():
    quadratic = ["w2", "cw2", "jw2", "gw2", "sinkhorn", "mmd_rbf", "cmmd_rbf"]
    assert all(pairwise_bytes(m, 1024) >= 16 * 1024 * 1024 for m in quadratic)  # ≥ two float64 n×n
    assert all(pairwise_bytes(m, 4096) == 16 * pairwise_bytes(m, 1024) for m in quadratic)
    assert all(pairwise_bytes(m, 4096) == 0 for m in ("sliced_w2", "gauss_w2", "gauss_kl", "mmd_linear"))


# ----------------------------------------------------------------------------- library-level input checks
@pytest.mark.parametrize("name", SAME_DIM)
def test_feature_dim_mismatch_names_both_dims(name):
    s, t, y = torch.randn(6, 3), torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"student d=3, teacher d=5"):
        metrics.get(name)(s, t, y, torch.randn(6, 4), torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"student d=3, teacher d=5.*student_dim"):
        KD2MLoss(name)(s, t, y, torch.randn(6, 4), torch.randn(6, 4))


def test_feature_dim_mismatch_with_projector_or_gw2_works():
    s, t, y = torch.randn(6, 3), torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.isfinite(KD2MLoss("cw2", student_dim=3, teacher_dim=5)(s, t, y))
    assert torch.isfinite(metrics.get("gw2")(s, t))


@pytest.mark.parametrize("name", CLASS_CONDITIONAL + ["jw2"])
def test_labels_of_wrong_length_or_dtype(name):
    s, t = torch.randn(6, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match="labels has length 5 but student has n=6"):
        metrics.get(name)(s, t, torch.tensor([0, 0, 1, 1, 2]))
    with pytest.raises(TypeError, match="labels must be an integer tensor, got torch.float32"):
        metrics.get(name)(s, t, torch.tensor([0.0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match="labels must be a 1-D tensor"):
        metrics.get(name)(s, t, torch.zeros(6, 1, dtype=torch.long))


@pytest.mark.parametrize("name", CLASS_CONDITIONAL)
def test_class_conditional_metric_without_labels(name):
    with pytest.raises(ValueError, match="needs labels"):
        metrics.get(name)(torch.randn(6, 3), torch.randn(6, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ALL)
def test_non_finite_features_are_refused(name, bad):
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    for side in (0, 1):
        feats = [torch.randn(6, 3), torch.randn(6, 3)]
        feats[side][2, 1] = bad
        with pytest.raises(ValueError, match=r"(student|teacher)_feats contains 1 NaN/inf value"):
            metrics.get(name)(feats[0], feats[1], y, torch.randn(6, 4), torch.randn(6, 4))


def _finite_value_and_grad(name, s, t, y, **opts):
    s = s.clone().requires_grad_(True)
    sl = torch.randn(s.shape[0], 3, requires_grad=True)
    value = metrics.get(name, **opts)(s, t, y, sl, torch.randn(t.shape[0], 3))
    value.backward()
    assert torch.isfinite(value), (name, opts, float(value))
    assert torch.isfinite(s.grad).all(), (name, opts)
    assert sl.grad is None or torch.isfinite(sl.grad).all()
    return value


def _variants(name):
    out = [{}]
    if name in ("mmd_rbf", "cmmd_rbf"):
        out.append({"unbiased": True})
    if name in ("gauss_w2", "gauss_cw2", "gauss_kl", "gauss_ckl"):
        out.append({"diagonal": True})
    if name == "jw2":
        out += [{"label_cost": "kl"}, {"label_cost": "sqeuclidean"}]
    return out


@pytest.mark.parametrize("name", ALL)
def test_batch_of_one_is_finite_or_a_clear_error(name):
    for opts in _variants(name):
        s, t, y = torch.randn(1, 4), torch.randn(1, 4), torch.tensor([3])
        if name == "mmd_rbf" and opts.get("unbiased"):  # the U-statistic is undefined for n = 1: said so
            with pytest.raises(ValueError, match="unbiased=True needs at least 2 samples per side"):
                metrics.get(name, **opts)(s, t, y)
            continue
        _finite_value_and_grad(name, s, t, y, **opts)


@pytest.mark.parametrize("name", ALL)
def test_a_class_with_one_sample_gives_a_finite_loss(name):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2])  # class 2 has a single sample
    for opts in _variants(name):
        _finite_value_and_grad(name, s, t, y, **opts)


@pytest.mark.parametrize("name", ALL)
def test_constant_feature_channel_is_finite(name):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)
    s[:, 2] = 0.7   # a dead student channel
    t[:, 2] = 0.0   # and a dead teacher channel (KL divides by its variance)
    t[:, 4] = -3.0
    y = torch.arange(12) % 3
    for opts in _variants(name):
        _finite_value_and_grad(name, s, t, y, **opts)


def test_gaussian_kl_of_identical_batches_with_a_dead_channel_is_zero():
    x = torch.randn(20, 4)
    x[:, 1] = 5.0
    for opts in ({}, {"diagonal": True}):
        assert abs(float(metrics.get("gauss_kl", **opts)(x, x.clone()))) < 1e-6


# ----------------------------------------------------------------------------- non-finite loss in training
def test_huge_learning_rate_stops_with_epoch_and_step(tmp_path):
    """A subprocess, so that any warning printed on the way would break the one-line contract."""
    r = subprocess.run(kd2m_cmd("run", *TINY, "--lr", "1e6", "--out", str(tmp_path / "o")),
                       env=ENV, capture_output=True, text=True, timeout=120)
    line = one_line_error(r.returncode, r.stderr, "teacher s0: non-finite", "at epoch 1, step ", "lower --lr")
    assert "no checkpoint was written yet" in line


def test_nan_metric_at_epoch_two_keeps_the_epoch_one_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    ckpt = out / "cw2" / "seed0" / "checkpoint.pt"
    seen = {}
    real_call = metrics.Metric.__call__

    def nan_from_epoch_two(self, *args):
        value = real_call(self, *args)
        if ckpt.exists():       # written at the end of epoch 1: we are in epoch 2
            seen.setdefault("bytes", ckpt.read_bytes())
            return value * float("nan")
        return value
    monkeypatch.setattr(metrics.Metric, "__call__", nan_from_epoch_two)
    argv = ["run", *TINY, "--epochs", "2", "--out", out]
    code, _, err = run_cli(argv, capsys)
    # a lower λ or lr changes the run's settings, which a resume refuses: the advice says so (it used
    # to say "lower --weight and rerun to resume from it"), within the 300-character line even at
    # pytest's long tmp paths (the fix first, one path)
    line = one_line_error(code, err, "cw2 s0: non-finite loss at epoch 2, step 1", "cw2=nan",
                          f"to lower --weight or --lr, delete {ckpt.parent} first",
                          "the same command resumes from its last good checkpoint, kept there")
    assert "ce=" in line
    assert ckpt.read_bytes() == seen["bytes"]            # untouched by the failed epoch
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "cw2" / "seed0" / "final.json").exists()
    assert not list(ckpt.parent.glob(".*.tmp"))
    # once the cause is gone, the same command resumes from epoch 1 and finishes
    monkeypatch.setattr(metrics.Metric, "__call__", real_call)
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    log = (out / "cw2" / "seed0" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2


def test_non_finite_student_features_name_the_epoch_and_step(tmp_path, capsys, monkeypatch):
    """Features that blow up reach the engine's check (with epoch and step), not the metric's."""
    from kd2m.train import Taps
    real = Taps.features

    def poisoned(self):
        return {k: f * float("inf") if f.requires_grad else f for k, f in real(self).items()}  # the student's taps
    monkeypatch.setattr(Taps, "features", poisoned)
    code, _, err = run_cli(["run", *TINY, "--out", tmp_path / "o"], capsys)
    one_line_error(code, err, "cw2 s0: non-finite student features at epoch 1, step 1")


def test_finite_features_too_large_for_a_float32_cost_read_as_a_non_finite_loss(tmp_path, capsys, monkeypatch):
    """A diverging student's features, finite but ~1e20, overflowed the float32 cost GEMM of exact
    OT: the solver's bare "exact_plan: cost contains NaN/inf" stopped the grid without naming the
    run, epoch or step (seen in an MNIST-1D λ sweep). The plan's cost now falls back to float64,
    the loss reads inf, and the engine says where."""
    from kd2m.metrics.exact import exact_plan, feature_plan
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    big = s * 1e20                                            # float32, finite
    c = torch.cat([big.double(), t.double()]).mean(0)
    want = exact_plan(-2 * (big.double() - c) @ (t.double() - c).T)   # the plan of the float64 cost
    assert all(torch.equal(a, b) for a, b in zip(feature_plan(big, t), want))
    for name in ("w2", "cw2", "jw2"):
        value = metrics.get(name)(s * 1e20, t, torch.arange(16) % 2)
        assert torch.isinf(value), name   # ~1e41 overflows the float32 result: inf, not a solver error
    from kd2m.train import Taps
    real = Taps.features

    def huge(self):
        return {k: f * 1e20 if f.requires_grad else f for k, f in real(self).items()}  # the student's taps
    monkeypatch.setattr(Taps, "features", huge)
    code, _, err = run_cli(["run", *TINY, "--out", tmp_path / "o"], capsys)
    one_line_error(code, err, "cw2 s0: non-finite loss at epoch 1, step 1", "cw2=inf")


def test_a_diverging_student_is_recorded_and_the_grid_finishes_the_others(tmp_path, capsys, monkeypatch):
    """A λ sweep whose largest λ diverges used to stop the whole grid at that run: the seeds and
    students after it never ran. Now the others finish, the tables flag the diverged run (left out
    of its method's mean), its run directory records where, and then the one-line error (exit 2)
    names it; rerunning retries it (its cause may be gone) and redoes nothing else."""
    out = tmp_path / "o"
    real_call = metrics.Metric.__call__

    def nan_for_seed0_w2(self, *args):
        value = real_call(self, *args)
        if self.name == "w2" and torch.initial_seed() % 1000 == 0:  # seed 0's run of w2 only
            return value * float("nan")
        return value
    monkeypatch.setattr(metrics.Metric, "__call__", nan_for_seed0_w2)
    argv = ["run", "--epochs", "1", "--teacher-epochs", "1", "--seeds", "2", "--baselines", "ce", "--metrics", "w2,cw2",
            "--no-progress", "--parallel", "1", "--out", out]
    code, log, err = run_cli(argv, capsys)
    line = one_line_error(code, err, "w2 s0: non-finite loss at epoch 1, step 1", "no checkpoint was written yet")
    assert "more diverged" not in line
    for key, seed in (("ce", 0), ("ce", 1), ("cw2", 0), ("cw2", 1), ("w2", 1)):   # every other run finished
        assert (out / key / f"seed{seed}" / "final.json").exists(), (key, seed)
    record = json.loads((out / "w2/seed0/diverged.json").read_text())
    assert record["where"].startswith("non-finite loss at epoch 1, step 1") and record["settings"]["seed"] == 0
    assert "seed 0 W2 (E)" in log and "diverged" in log
    md = (out / "results.md").read_text()
    assert "| W2 (E) |" in md and "(!) diverged" in md and "W2 (E) on seed 0." in md
    assert "unfinished" not in md  # diverged is said as such, not as an unfinished run
    assert json.loads((out / "results.json").read_text())["diverged"] == {"w2": {"label": "W2 (E)", "seeds": [0]}}
    # the cause gone: the same command retries the diverged run only, and the record goes
    monkeypatch.setattr(metrics.Metric, "__call__", real_call)
    code, log, err = run_cli(argv, capsys)
    assert code == 0, err
    assert log.count("(finished earlier)") == 2 + 5      # two teachers, five students
    assert (out / "w2/seed0/final.json").exists() and not (out / "w2/seed0/diverged.json").exists()
    assert "diverged" not in (out / "results.md").read_text()


def test_a_student_diverging_on_every_seed_gets_a_row_saying_so():
    rows = [{"method": "ce", "label": "student (CE only)", "seed": s, "test_acc": 0.9 + s / 100} for s in range(3)]
    md = R.markdown_table(rows, "digits", expected_seeds=3, diverged={"w2@auto*10": {"label": "W2 (E) λ=auto*10", "seeds": [0, 1, 2]}})
    assert "| W2 (E) λ=auto*10 | diverged | 0 (!) |" in md
    assert "W2 (E) λ=auto*10 on seeds 0, 1, 2" in md


# ----------------------------------------------------------------------------- a full disk
def _fail_writes(monkeypatch, match, fail_on=2):
    """Make the ``fail_on``-th atomic write whose temp file path contains ``match`` hit ENOSPC halfway."""
    real_fdopen = os.fdopen
    calls = {"n": 0}

    class HalfWritten:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            self._f.write(data[: len(data) // 2])
            self._f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, key):
            return getattr(self._f, key)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        if match in os.readlink(f"/proc/self/fd/{fd}"):
            calls["n"] += 1
            if calls["n"] == fail_on:
                return HalfWritten(f)
        return f
    monkeypatch.setattr(ckpt_mod.os, "fdopen", fdopen)
    return calls


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_disk_full_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    _fail_writes(monkeypatch, ".state.pt.")
    save_checkpoint(path, {"w": torch.arange(1000.0)})
    before = path.read_bytes()
    with pytest.raises(OSError) as info:
        save_checkpoint(path, {"w": torch.zeros(1000)})
    assert info.value.errno == errno.ENOSPC and str(path) in str(info.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]   # no temp file left behind
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(1000.0))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_disk_full_during_training_is_one_line_and_keeps_epoch_one(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    run_dir = out / "cw2" / "seed0"
    snapshot = {}
    real = atomic_write_bytes

    def spy(path, data, durable=True):  # remember the last checkpoint that reached the disk
        real(path, data, durable)
        if str(path).endswith("cw2/seed0/checkpoint.pt"):
            snapshot["bytes"] = bytes(data)
    monkeypatch.setattr(ckpt_mod, "atomic_write_bytes", spy)
    _fail_writes(monkeypatch, "cw2/seed0/.checkpoint.pt.", fail_on=2)
    code, _, err = run_cli(["run", *TINY, "--epochs", "2", "--out", out], capsys)
    one_line_error(code, err, "No space left on device", "checkpoint.pt")
    assert (run_dir / "checkpoint.pt").read_bytes() == snapshot["bytes"]
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 1
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_into_a_missing_parent_under_a_file_names_the_path(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OSError) as info:
        atomic_write_bytes(tmp_path / "f" / "x.bin", b"data")
    assert str(tmp_path / "f") in str(info.value)


# ----------------------------------------------------------------------------- code-executing pickles
def test_pickle_that_runs_code_is_refused_as_pretrained_student(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    _evil_pickle(tmp_path / "evil.pt", marker)
    code, _, err = run_cli(["run", *TINY, "--pretrained-student", tmp_path / "evil.pt", "--out", tmp_path / "o"],
                           capsys)
    one_line_error(code, err, "evil.pt")
    assert not marker.exists()


def test_pickle_that_runs_code_is_refused_as_a_run_checkpoint(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    from kd2m.rundir import RunDir
    RunDir(tmp_path / "o").mark()
    run_dir = tmp_path / "o" / "cw2" / "seed0"
    run_dir.mkdir(parents=True)
    _evil_pickle(run_dir / "checkpoint.pt", marker)
    code, _, err = run_cli(["run", *TINY, "--out", tmp_path / "o"], capsys)
    line = one_line_error(code, err, str(run_dir / "checkpoint.pt"), "weights_only=True")
    assert "weights_only=False" not in line  # never advise the unsafe load
    assert not marker.exists()
    with pytest.raises(ValueError, match="refused"):
        load_checkpoint(run_dir / "checkpoint.pt")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", None], ids=["empty", "bad-pickle", "random"])
def test_corrupt_run_checkpoint_is_a_clear_error(tmp_path, capsys, content):
    from kd2m.rundir import RunDir
    RunDir(tmp_path / "o").mark()  # a kd2m output directory whose run checkpoint got corrupted
    run_dir = tmp_path / "o" / "cw2" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(os.urandom(2048) if content is None else content)
    code, _, err = run_cli(["run", *TINY, "--out", tmp_path / "o"], capsys)
    one_line_error(code, err, "checkpoint.pt", "corrupt")


# ----------------------------------------------------------------------------- a killed grid resumes
def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_killed_bench_grid_resumes_without_redoing_or_duplicating(tmp_path):
    out = tmp_path / "grid"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"dataset: digits\nepochs: 2\nteacher_epochs: 1\nseeds: 2\nbaselines: []\n"
                   f"metrics: [cw2, gauss_w2]\nout: {out}\nprogress: false\n")
    first = out / "cw2" / "seed0" / "final.json"
    proc = subprocess.Popen(kd2m_cmd("bench", str(cfg)), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while not first.exists() and proc.poll() is None and time.time() - t0 < 120:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the grid finished before it could be killed"
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/final.json")}
    assert first in finished and out / "teacher" / "seed0" / "final.json" in finished
    assert len(finished) < 6
    r = subprocess.run(kd2m_cmd("bench", str(cfg)), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was redone"
    keys = [(row["method"], int(row["seed"])) for row in _read_csv(out / "results.csv")]
    assert sorted(keys) == sorted({(m, s) for m in ("teacher", "cw2", "gauss_w2") for s in (0, 1)})
    assert len(keys) == len(set(keys)) == 6


def test_atomic_writes_make_ordinary_readable_files(tmp_path):
    """mkstemp creates 0600 files; results and checkpoints must get the usual umask-based mode."""
    import os
    import stat
    from kd2m.atomic_io import atomic_write_text
    target = tmp_path / "results.md"
    atomic_write_text(target, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_atomic_write_fsyncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    """Without the directory's fsync a power loss can undo the rename (the new name never reached the disk)."""
    import stat
    target = tmp_path / "sub" / "final.json"
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        synced.append((stat.S_ISDIR(st.st_mode), st.st_ino, target.exists()))
        return real_fsync(fd)
    monkeypatch.setattr(ckpt_mod.os, "fsync", spy)
    atomic_write_bytes(target, b"{}")
    directory = target.parent.stat().st_ino
    assert synced[0][0] is False                     # the data file first
    assert synced[-1] == (True, directory, True)     # then its directory, after the rename


# ----------------------------------------------------------------------------- --device
def _fake_accelerators(monkeypatch, cuda=0, mps=False, xpu=0):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: xpu > 0)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: xpu)


@pytest.mark.parametrize("name, machine, expected", [
    ("auto", {}, "cpu"), (None, {}, "cpu"), ("auto", {"cuda": 1}, "cuda"), ("cpu", {"cuda": 2}, "cpu"),
    ("cuda", {"cuda": 1}, "cuda"), ("cuda:1", {"cuda": 2}, "cuda:1"), ("mps", {"mps": True}, "mps"),
    ("xpu:0", {"xpu": 1}, "xpu:0"),
])
def test_resolve_device_accepts_what_the_machine_has(monkeypatch, name, machine, expected):
    from kd2m.runtime import resolve_device
    _fake_accelerators(monkeypatch, **machine)
    assert resolve_device(name) == torch.device(expected)


@pytest.mark.parametrize("name, machine, needles", [
    ("cuda", {}, ["CUDA is not available", "--device cpu"]),
    ("cuda:2", {"cuda": 2}, ["2 CUDA device(s)", "cuda:0 to cuda:1"]),
    ("mps", {}, ["MPS", "not available"]),
    ("xpu", {}, ["XPU is not available"]),
    ("xpu:1", {"xpu": 1}, ["1 XPU device(s)"]),
    ("meta", {"cuda": 1}, ["'meta'", "valid: auto, cpu, cuda, cuda:N, mps"]),
    ("quantum", {}, ["'quantum'", "valid: auto, cpu, cuda, cuda:N, mps"]),
    ("cuda:x", {"cuda": 1}, ["'cuda:x'", "valid:"]),
])
def test_resolve_device_refuses_what_the_machine_lacks(monkeypatch, name, machine, needles):
    from kd2m.runtime import resolve_device
    _fake_accelerators(monkeypatch, **machine)
    with pytest.raises(ValueError) as info:
        resolve_device(name)
    for needle in needles:
        assert needle in str(info.value)


def test_seed_everything_repeats_every_rng():
    import random

    import numpy as np

    from kd2m.runtime import seed_everything

    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(()))
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        seed_everything(2**32 + 5)          # numpy takes seed mod 2^32
        first = draw()
        seed_everything(2**32 + 5)
        assert draw() == first
        seed_everything(5)
        again = draw()
        assert again[1] == first[1] and again[0] != first[0]   # (torch's CPU generator, too, keeps 32 bits)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


# ----------------------------------------------------------------------------- the command line itself
@pytest.mark.parametrize("argv, needles", [
    (["run", "--epochs", "x"], ["--epochs", "invalid int value: 'x'", "kd2m run --help"]),
    (["run", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["frob"], ["invalid choice: 'frob'", "kd2m --help"]),
    ([], ["required: command"]),
    (["bench", "--sweep"], ["--sweep", "expected one argument"]),
    (["run", "--threads", "-3"], ["--threads", "≥ 0", "-3", "kd2m run --help"]),
    (["bench", "--num-workers", "-1"], ["--num-workers", "≥ 0", "-1"]),
], ids=["bad-int", "unknown-option", "unknown-command", "no-command", "missing-value", "negative-threads",
        "negative-workers"])
def test_bad_command_line_is_one_line_exit_2(argv, needles, capsys, tmp_path, monkeypatch):
    import kd2m.grid
    monkeypatch.setattr(kd2m.grid, "run_grid", lambda *a, **k: pytest.fail("the grid started"))
    with pytest.raises(SystemExit) as info:
        main(argv + ["--out", str(tmp_path / "o")] if argv[:1] in (["run"], ["bench"]) and "--sweep" not in argv
             else argv)
    assert info.value.code == 2
    one_line_error(2, capsys.readouterr().err, *needles)


def test_help_still_prints_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kd2m run") and "--batch-size" in out


@pytest.mark.parametrize("error", [MemoryError(), torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to "
                                                                              "allocate 20.00 GiB\nmore")],
                         ids=["MemoryError", "cuda-OOM"])
def test_out_of_memory_is_one_line_with_advice(error, capsys, monkeypatch):
    import kd2m.cli

    def oom(args):
        raise error
    monkeypatch.setattr(kd2m.cli, "cmd_metrics", oom)
    code, _, err = run_cli(["metrics"], capsys)
    assert code == 2
    one_line_error(code, err, "out of memory", type(error).__name__, "smaller --batch-size")


def test_error_messages_are_capped(capsys, monkeypatch):
    import kd2m.cli

    def huge(args):
        raise ValueError("seeds: got [" + "x, " * 1_000_000 + "]")
    monkeypatch.setattr(kd2m.cli, "cmd_metrics", huge)
    code, _, err = run_cli(["metrics"], capsys)
    line = one_line_error(code, err, "seeds: got [x, x")
    assert code == 2 and len(line) <= len("kd2m: error: ") + 300 and line.endswith("…")


def test_a_444_byte_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    """9**9 (387 million) leaves: expanded or printed, that was an 800 MB error message and 3 GB of memory."""
    text = _alias_bomb(9, 9)
    assert len(text) < 460
    t0 = time.perf_counter()
    code, _, err = run_cli(_yaml(tmp_path, text), capsys)
    assert time.perf_counter() - t0 < 5
    one_line_error(code, err, "aliases", "more than 10000 values")


def test_config_errors_quote_a_bounded_part_of_the_value(tmp_path, capsys):
    items = ", ".join(str(i) for i in range(5000))
    code, _, err = run_cli(_yaml(tmp_path, f"epochs: [{items}]\n"), capsys)
    line = one_line_error(code, err, "epochs", "int", "[0, 1, 2")
    assert len(line) < 250


def test_yaml_anchors_of_a_real_config_still_work(tmp_path):
    from kd2m.config import load_yaml
    p = tmp_path / "c.yaml"
    p.write_text("metrics: [gauss_kl, gauss_ckl]\nmetric_options: {gauss_kl: &r {ridge: 0.1}, gauss_ckl: *r}\n"
                 "seeds: [0, 1]\n")
    cfg = load_yaml(p)
    assert cfg.term_options == {"gauss_kl": {"ridge": 0.1}, "gauss_ckl": {"ridge": 0.1}} and cfg.seeds == [0, 1]


# ----------------------------------------------------------------------------- imagefolder sizes
def _pngs(root, sizes, mode="L"):
    """train/<class>/ and test/<class>/ PNGs; ``sizes`` are the train images' (width, height), cycled over 2 classes."""
    import numpy as np
    from PIL import Image
    for split, wanted in (("train", sizes), ("test", [(8, 8)] * 2)):
        for i, (w, h) in enumerate(wanted):
            folder = root / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            channels = () if mode == "L" else (3,)
            Image.fromarray(np.full((h, w, *channels), 40 * i % 256, dtype=np.uint8), mode=mode).save(
                folder / f"{i}.png")


def test_imagefolder_size_is_the_majority_not_the_first_image(tmp_path):
    """One 6000 px image (sorted first) among 8 px ones used to upscale everything to 6000 px."""
    from kd2m.data import build_dataset
    from kd2m.data.imagefolder import ImageSizeWarning
    _pngs(tmp_path, [(6000, 6000)] + [(8, 8)] * 5)
    with pytest.warns(ImageSizeWarning, match=r"1 of 6 training images are not 8×8.*resized to 8×8"):
        bundle = build_dataset("imagefolder", data_root=tmp_path, augment=False)
    assert bundle.image_size == 8
    assert tuple(bundle.train[0][0].shape) == (1, 8, 8)   # the big one, downscaled


def test_imagefolder_explicit_size_and_majority_channels(tmp_path):
    import warnings
    from kd2m.data.imagefolder import imagefolder
    _pngs(tmp_path, [(8, 8)] * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # same-size images: nothing to say
        bundle = imagefolder(tmp_path, augment=False, image_size=5)
    assert bundle.image_size == 5 and tuple(bundle.train[1][0].shape) == (1, 5, 5)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="image_size must be a positive integer"):
            imagefolder(tmp_path, image_size=bad)
    from PIL import Image
    mixed = tmp_path / "mixed"
    for split in ("train", "test"):
        (mixed / split / "c0").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(mixed / "train" / "c0" / "0.png")      # the first image is RGB,
    for i in range(1, 4):                                                 # the other three grayscale
        Image.new("L", (8, 8)).save(mixed / "train" / "c0" / f"{i}.png")
    Image.new("L", (8, 8)).save(mixed / "test" / "c0" / "0.png")
    assert imagefolder(mixed, augment=False).in_channels == 1
