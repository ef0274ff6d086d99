"""The training loop as the Trainer runs it: the loss it optimises, the terms it builds, the labels, layers,
cache views and state it hands them, gradients and train mode per step, thread count in its settings."""
import json

import pytest
import torch

from kd2m.data import build_dataset
from kd2m.features import FeatureTap
from kd2m.harness.cli import main
from kd2m.harness.config import RunConfig
from kd2m.harness.trainer import Trainer
from kd2m.training.build import build_student, build_teacher, freeze

from helpers import ONE_EPOCH_GRID, run_cli


def test_two_same_name_terms_on_one_layer_get_their_own_log_keys(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"out: {tmp_path / 'o'}\nmetrics: []\nbaselines: []\n"
                   "students:\n  two: [{term: cw2, weight: 0.1}, {term: cw2, weight: auto}]\n")
    code, _, err = run_cli(["bench", cfg, *ONE_EPOCH_GRID], capsys)
    assert code == 0, err
    row = json.loads((tmp_path / "o/two/seed0/log.jsonl").read_text().splitlines()[0])
    keys = ["cw2@penultimate#1", "cw2@penultimate#2"]
    assert sorted(row["terms"]) == keys and sorted(row["weights"]) == keys
    assert row["weights"][keys[0]] == 0.1 and row["weights"][keys[1]] != 0.1
    assert row["distill"] == pytest.approx(sum(row["weights"][k] * row["terms"][k] for k in keys), rel=1e-6)
    final = json.loads((tmp_path / "o/two/seed0/final.json").read_text())
    assert sorted(final["auto_scales"]) == keys and final["auto_scales"][keys[0]] == 1.0


def test_a_cpu_runs_thread_count_is_part_of_its_settings(tmp_path):
    from kd2m.data import build_dataset
    from kd2m.harness.trainer import Trainer
    from kd2m.training.build import build_student
    cfg = RunConfig(epochs=1, progress=False, metrics=[], baselines=["ce"]).resolved()
    bundle = build_dataset("digits")
    before = torch.get_num_threads()
    try:
        settings = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            settings[n] = Trainer(build_student(cfg, bundle, 0), bundle, cfg, cfg.methods()[0], 0, tmp_path,
                                  torch.device("cpu")).settings
    finally:
        torch.set_num_threads(before)
    assert "threads" not in settings[1] and settings[2]["threads"] == 2   # one thread: the settings as before
    assert {k: v for k, v in settings[2].items() if k != "threads"} == settings[1]


def _setup(tmp_path, name="r", **cfg_fields):
    """A set-up Trainer (terms bound, λ calibrated) for the first student of a digits config."""
    cfg = RunConfig(epochs=1, progress=False, diagnostics=False, **cfg_fields).resolved()
    bundle = build_dataset("digits")
    teacher = freeze(build_teacher(cfg, bundle, 0))
    tr = Trainer(build_student(cfg, bundle, 0), bundle, cfg, cfg.methods()[0], 0, tmp_path / name,
                 torch.device("cpu"), teacher=teacher, teacher_caches={})
    tr._setup()
    return tr


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


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("match", ["global", "local"])
def test_the_engine_builds_distances_with_the_configured_match(tmp_path, match):
    """--match local reached the config but not the terms (they always gathered the global batch)."""
    from kd2m.data import build_dataset
    from kd2m.harness.config import RunConfig
    from kd2m.harness.trainer import Trainer
    from kd2m.training.build import build_student, build_teacher
    cfg = RunConfig(metrics=["cw2"], baselines=[], match=match, epochs=1, progress=False).resolved()
    bundle = build_dataset("digits")
    tr = Trainer(build_student(cfg, bundle, 0), bundle, cfg, cfg.methods()[0], 0, tmp_path / "r",
                 torch.device("cpu"), teacher=build_teacher(cfg, bundle, 0))
    tr._setup()
    assert [b.module.loss.match for b in tr.terms] == [match]


@pytest.mark.parametrize("negatives", ["other_class", "uniform"])
def test_the_engine_gives_crd_the_training_labels_it_draws_negatives_by(tmp_path, negatives):
    """CRD drew its negatives uniformly; RepDistiller's default draws them from other classes,
    which needs every training sample's label from the engine (and a run's draws stay on the
    global RNG, so resumes replay them)."""
    from kd2m.data import build_dataset
    from kd2m.harness.config import RunConfig
    from kd2m.harness.trainer import Trainer
    from kd2m.training.build import build_student, build_teacher
    cfg = RunConfig(baselines=["crd"], metrics=[], epochs=1, progress=False,
                    term_options={"crd": {"negatives": negatives, "nce_k": 50}}).resolved()
    bundle = build_dataset("digits")
    tr = Trainer(build_student(cfg, bundle, 0), bundle, cfg, cfg.methods()[0], 0, tmp_path / "r",
                 torch.device("cpu"), teacher=build_teacher(cfg, bundle, 0))
    tr._setup()
    (crd,) = [b.module for b in tr.terms]
    assert crd.negatives == negatives
    labels = bundle.train.labels
    index = torch.arange(0, 40)
    idx = crd.contrast_index(index)
    same = labels[idx[:, 1:]] == labels[index][:, None]
    if negatives == "other_class":
        assert torch.equal(crd.train_labels, labels) and not same.any()
    else:  # uniform over 10 classes: about a tenth of the 2000 draws share the anchor's class
        assert 100 < int(same.sum()) < 300


def test_ce_weight_scales_ce_in_the_loss_and_is_part_of_a_runs_settings(tmp_path, capsys):
    """mdistiller's and RepDistiller's KD is 0.1·CE + 0.9·KD: a student's CE weight (the term's
    registered one, or ``ce_weights``) multiplies CE in the loss every epoch, is stored with the run,
    and a run made with another CE weight is not silently reused."""
    out = tmp_path / "r"
    cfg = tmp_path / "c.yaml"
    body = (f"out: {out}\nepochs: 2\nteacher_epochs: 1\nseeds: [0]\nbaselines: [ce, kd, dkd]\nmetrics: []\n"
            "progress: false\nweights: {{kd: 0.9, dkd: 0.1}}\n{extra}"
            "students:\n  combo: [{{term: gauss_w2, weight: 0.3}}, {{term: kd, weight: 0.7}}]\n")
    cfg.write_text(body.format(extra="ce_weights: {combo: 0.25}\n"))
    assert main(["bench", str(cfg)]) == 0
    for key, w_ce, lam in (("kd", 0.1, {"kd": 0.9}), ("dkd", 1.0, {"dkd": 0.1}),
                           ("combo", 0.25, {"gauss_w2": 0.3, "kd": 0.7})):
        for e in _log(out / key / "seed0/log.jsonl"):
            if key != "dkd":  # dkd warms its λ up
                assert e["weights"] == pytest.approx(lam)
            want = w_ce * e["ce"] + sum(e["weights"][k] * e["terms"][k] for k in e["terms"])
            assert e["loss"] == pytest.approx(want, rel=1e-6), key
        settings = json.loads((out / key / "seed0/final.json").read_text())["settings"]
        assert settings.get("ce_weight", 1.0) == w_ce and ("ce_weight" in settings) == (w_ce != 1.0)
    assert "ce_weight" not in json.loads((out / "ce/seed0/final.json").read_text())["settings"]
    header = (out / "results.md").read_text().split("\n\n")[1]
    assert "kd 0.9 (CE×0.1)" in header and "combo auto×0.3" not in header and "combo 0.3 + 0.7 (CE×0.25)" in header
    # the same directory with kd's CE weight changed: refused, not reused
    cfg.write_text(body.format(extra="ce_weights: {combo: 0.25, kd: 0.2}\n"))
    assert main(["bench", str(cfg)]) == 2
    assert "ce_weight 0.1 there, 0.2 now" in capsys.readouterr().err


def _lm_corpus(tmp_path):
    """A small text corpus: under the LM defaults a byte-level GPT-2 student (width 64, dropout on)
    learns it from a teacher of width 128, so its distances need a projector."""
    from helpers import python_docs_text
    return python_docs_text(tmp_path / "corpus.txt", 6000)


def test_a_distance_at_weight_0_leaves_the_ce_only_student_exactly(tmp_path, capsys):
    """A term's projector was initialised from the run's random stream, so a student with dropout drew
    other masks than the CE-only student of its seed: at weight 0 a W2 student ended 32.334 in
    perplexity where CE ended 32.379. Its weights are now the CE-only student's, bit for bit."""
    corpus = _lm_corpus(tmp_path)
    out = tmp_path / "grid"
    rc, _, err = run_cli(["run", "--task", "lm", "--dataset", f"text:{corpus}", "--baselines", "ce", "--metrics", "w2",
                          "--weight", "0", "--epochs", "1", "--teacher-epochs", "1", "--seeds", "1",
                          "--image-size", "16", "--parallel", "1", "--no-progress", "--out", out], capsys)
    assert rc == 0, err
    ce, w2 = (torch.load(out / m / "seed0" / "model.pt", weights_only=True) for m in ("ce", "w2"))
    assert ce.keys() == w2.keys() and all(torch.equal(ce[k], w2[k]) for k in ce)
    assert json.loads((out / "w2/seed0/final.json").read_text())["test_ppl"] == \
        json.loads((out / "ce/seed0/final.json").read_text())["test_ppl"]


def test_every_rank_starts_from_the_same_projector(tmp_path, monkeypatch):
    """Under torchrun each rank seeds its stream with seed + 1000·rank, and the projector was drawn
    from it: each rank trained its own projector (their gradients are averaged, so they never met)."""
    from kd2m import distributed as dist_ctx
    corpus = _lm_corpus(tmp_path)
    cfg = RunConfig(task="lm", dataset=f"text:{corpus}", metrics=["w2"], baselines=[], weights={"w2": 1.0},
                    epochs=1, image_size=16, teacher_cache=0, progress=False).resolved()
    bundle = build_dataset(cfg.dataset, image_size=cfg.image_size, tokenizer=cfg.tokenizer)

    def projector(rank):
        monkeypatch.setattr(dist_ctx, "rank", lambda: rank)
        tr = Trainer(build_student(cfg, bundle, 0), bundle, cfg, cfg.methods()[0], 0, tmp_path / f"r{rank}",
                     torch.device("cpu"), teacher=build_teacher(cfg, bundle, 0))
        tr._setup()
        return [p.detach() for b in tr.terms for p in b.module.parameters()], torch.get_rng_state()
    (w0, stream0), (w1, stream1) = projector(0), projector(1)
    assert len(w0) == 1 and w0[0].shape == (128, 64) and torch.equal(w0[0], w1[0])
    assert not torch.equal(stream0, stream1)  # the ranks' own streams (dropout, augmentation) still differ
