"""configs/crd/: each method run as its authors' released configs run that pair.

The table below is written out from the authors' files (commits as in the configs' comments):
mdistiller configs/cifar100/dkd/*.yaml + mdistiller/engine/cfg.py (DKD), image_classification_sota
configs/strategies/distill/dist_cifar.yaml (DIST), logit-standardization-KD logs/{KD,DKD}/*.txt
names and tools/train.py (LS), JiamingLv/WKD configs/cifar100/{wkd_l,wkd_f,wkd_lf}/*.yaml (WKD),
RepDistiller train_student.py L93-94 (the learning rate). Every config is loaded with the real
loader and resolved, and every per-pair value compared with it; plus the ``cosine_after``
schedule that WKD's decay needs.
"""
import math
import sys

import pytest

from kd2m.harness.config import load_yaml
from kd2m.training.methods import TermConfig, method_label, parse_schedule, term_from_entry

from helpers import REPO_ROOT

CRD = REPO_ROOT / "configs" / "crd"

# (teacher, student): lr, DKD β (mdistiller), LS-KD (T, w), LS-DKD (T, w, β before ×w), WKD-L (γ, T),
# WKD-F (λ, ratio, grid), WKD-L+F (γ, T, λ, ratio, grid). LS and WKD values of pairs their authors did
# not run are their defaults / resnet32x4 → resnet8x4 values, as the configs say.
RES8 = dict(wkd_l=(600, 8), wkd_f=(0.08, 4, 1), wkd_lf=(200, 8, 0.08, 8, 1))   # wkd_*/res32x4_res8x4.yaml
SHUV1 = dict(wkd_l=(200, 6), wkd_f=(0.3, 3, 4), wkd_lf=(60, 4, 0.5, 3, 4))     # wkd_*/wrn40_2_shuv1.yaml
TABLE = {
    ("resnet32x4", "resnet8x4"): dict(lr=0.05, beta=8, ls_kd=(2, 9), ls_dkd=(2, 9, 8), **RES8),
    ("resnet32x4", "ShuffleV1"): dict(lr=0.01, beta=8, ls_kd=(2, 9), ls_dkd=(2, 9, 8), **RES8),
    ("resnet32x4", "ShuffleV2"): dict(lr=0.01, beta=8, ls_kd=(2, 9), ls_dkd=(2, 9, 8), **RES8),
    ("wrn_40_2", "ShuffleV1"): dict(lr=0.01, beta=8, ls_kd=(2, 9), ls_dkd=(2, 9, 8), **SHUV1),
    ("vgg13", "MobileNetV2"): dict(lr=0.01, beta=6, ls_kd=(3, 9), ls_dkd=(3, 9, 2), **RES8),
    ("vgg13", "vgg8"): dict(lr=0.05, beta=6, ls_kd=(3, 9), ls_dkd=(2, 15, 2), **RES8),
    ("wrn_40_2", "wrn_16_2"): dict(lr=0.05, beta=6, ls_kd=(2, 9), ls_dkd=(2, 12, 2), **RES8),
    ("wrn_40_2", "wrn_40_1"): dict(lr=0.05, beta=6, ls_kd=(2, 9), ls_dkd=(2, 12, 2), **RES8),
    ("resnet56", "resnet20"): dict(lr=0.05, beta=2, ls_kd=(2, 9), ls_dkd=(3, 18, 2), **RES8),
    ("resnet110", "resnet32"): dict(lr=0.05, beta=2, ls_kd=(2, 9), ls_dkd=(2, 15, 2), **RES8),
}
# the same for every pair: mdistiller cfg.py / RepDistiller scripts (the registered defaults)
COMMON = {"kd": (0.9, 0.1, {"temperature": 4.0}), "fitnet": (100, 1.0, {}), "at": (1000, 1.0, {}),
          "nst": (50, 1.0, {}), "pkt": (30000, 1.0, {}), "rkd": (1.0, 1.0, {}), "crd": (0.8, 1.0, {})}
DECAY = "cosine_after:150"   # WKD: COSINE_DECAY_EPOCH 150 in every CIFAR-100 config


def _methods(teacher, student):
    c = load_yaml(CRD / f"{teacher}_{student}.yaml")
    c.pretrained_teacher = "teacher.pth"  # as the configs' command line gives it
    c = c.resolved()
    return c, {m.key: m for m in c.methods()}


def _term(m, i=0):
    t = m.terms[i]
    return t.weight, t.option_dict, t.schedule, t.warmup_epochs


def test_there_is_one_config_per_pair():
    assert sorted(p.stem for p in CRD.glob("*.yaml")) == sorted(f"{t}_{s}" for t, s in TABLE)


@pytest.mark.parametrize("pair", list(TABLE), ids=lambda p: f"{p[0]}_{p[1]}")
def test_every_per_pair_value_is_the_authors(pair):
    want = TABLE[pair]
    c, m = _methods(*pair)
    assert (c.teacher, c.student, c.lr) == (*pair, want["lr"])
    assert (c.epochs, c.batch_size, c.lr_milestones, c.lr_gamma, c.weight_decay) == (240, 64, [150, 180, 210], 0.1,
                                                                                    5e-4)
    assert set(m) == {"ce", "kd", "dkd", "dist", "pkt", "rkd", "crd", "fitnet", "at", "nst", "wkd_f", "ls_kd",
                      "ls_dkd", "wkd_l", "wkd_l+wkd_f", "w2", "cw2", "jw2", "gauss_w2", "gauss_cw2", "gauss_kl",
                      "mmd_rbf"}
    for key, (weight, ce, options) in COMMON.items():
        assert (m[key].terms[0].weight, m[key].ce_weight) == (weight, ce), key
        assert m[key].terms[0].option_dict == options, key
    # DKD: mdistiller's per-pair β; α 1, T 4, warm-up 20 from cfg.py (the registration), λ 1, CE 1
    assert _term(m["dkd"]) == (1.0, {"beta": want["beta"]}, "constant", 20) and m["dkd"].ce_weight == 1.0
    # DIST: 1·CE + 2·DIST, τ 4 (dist_t4), β = γ = 1 (the registration)
    assert _term(m["dist"]) == (2.0, {"temperature": 4}, "constant", 0) and m["dist"].ce_weight == 1.0
    # LS-KD: 0.1·CE + w·KD(z-scored logits, T); LS-DKD: α = w, β = β·w, T, CE 1, warm-up 20
    t, w = want["ls_kd"]
    assert _term(m["ls_kd"]) == (w, {"temperature": t, "standardize": True}, "constant", 0)
    assert m["ls_kd"].ce_weight == 0.1
    t, w, beta = want["ls_dkd"]
    assert _term(m["ls_dkd"]) == (1.0, {"alpha": w, "beta": beta * w, "temperature": t, "standardize": True},
                                  "constant", 20)
    assert m["ls_dkd"].ce_weight == 1.0
    # WKD-L: the target-class part undecayed, γ·WD decayed after epoch 150; CE 1
    gamma, t = want["wkd_l"]
    assert [_term(m["wkd_l"], i) for i in (0, 1)] == [
        (1.0, {"gamma": 0, "temperature": t}, "constant", 0),
        (gamma, {"gamma": 1, "target": False, "temperature": t}, DECAY, 0)]
    assert m["wkd_l"].ce_weight == 1.0 and m["wkd_l"].label == "WKD-L"
    # WKD-F alone and with WKD-L
    lam, ratio, grid = want["wkd_f"]
    assert _term(m["wkd_f"]) == (lam, {"mean_cov_ratio": ratio, "spatial_grid": grid}, DECAY, 0)
    gamma, t, lam, ratio, grid = want["wkd_lf"]
    both = m["wkd_l+wkd_f"]
    assert [_term(both, i) for i in range(3)] == [
        (1.0, {"gamma": 0, "temperature": t}, "constant", 0),
        (gamma, {"gamma": 1, "target": False, "temperature": t}, DECAY, 0),
        (lam, {"mean_cov_ratio": ratio, "spatial_grid": grid}, DECAY, 0)]
    assert both.ce_weight == 1.0 and both.label == "WKD-L + WKD-F"
    labels = [x.label for x in m.values()]
    assert len(set(labels)) == len(labels) and m["ls_kd"].label == "KD + LS" and m["ls_dkd"].label == "DKD + LS"


def test_wkd_weights_follow_wkds_cosine_decay():
    # JiamingLv/WKD mdistiller/distillers/WKD.py L203-211 with 1-based epochs e:
    # w(e) = w0 for e <= 150, else 0.5·w0·(1 + cos((e - 150) / (240 - 150) · π))
    _, m = _methods("resnet32x4", "resnet8x4")
    target, transport = m["wkd_l"].terms
    for epoch in range(240):  # kd2m's epochs are 0-based
        e = epoch + 1
        factor = 1.0 if e <= 150 else 0.5 * (1 + math.cos((e - 150) / (240 - 150) * math.pi))
        assert transport.weight_at(epoch, 240) == pytest.approx(600 * factor, abs=1e-12)
        assert target.weight_at(epoch, 240) == 1.0
    assert transport.weight_at(149, 240) == 600 and transport.weight_at(239, 240) == pytest.approx(0, abs=1e-12)


def test_cosine_after_schedule():
    term = TermConfig("kd", weight=2.0, schedule="cosine_after:3")
    assert [term.weight_at(e, 7) for e in range(7)] == pytest.approx(
        [2, 2, 2, 2 * 0.5 * (1 + math.cos(math.pi / 4)), 1.0, 2 * 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0])
    assert TermConfig("kd", schedule="cosine_after:10").weight_at(4, 5) == 1.0   # never reached: constant
    warm = TermConfig("dkd", weight=1.0, warmup=2, schedule="cosine_after:2")
    assert [warm.weight_at(e, 4) for e in range(4)] == pytest.approx([0.5, 1.0, 0.5, 0.0])
    assert parse_schedule("cosine_after:150") == ("cosine_after", 150)
    assert parse_schedule("linear_up") == ("linear_up", None)
    for bad in ("cosine_after", "cosine_after:", "cosine_after:-1", "cosine_after:1.5", "cosine", 150, None):
        with pytest.raises(ValueError, match="schedule"):
            term_from_entry({"term": "kd", "schedule": bad}, "students: x[0]")
    entry = term_from_entry({"term": "wkd_f", "schedule": "cosine_after:150"}, "students: x[0]")
    assert entry.schedule == "cosine_after:150" and entry.describe()["schedule"] == "cosine_after:150"


def test_a_term_split_in_parts_is_labelled_once():
    parts = (TermConfig("wkd_l", options=(("gamma", 0),)), TermConfig("wkd_l", 600.0, schedule=DECAY))
    assert method_label("x", parts) == "WKD-L"
    layers = (TermConfig("gauss_w2", student_layer="layer2"), TermConfig("gauss_w2", student_layer="layer3"))
    assert method_label("x", layers).count("+") == 1   # other layers: still two parts


def test_the_documented_per_pair_table_is_this_table():
    """The CIFAR page's table, as the site's build reads it from the configs, holds these values."""
    sys.path.insert(0, str(REPO_ROOT / "docs" / "_ext"))
    from kd2m_reference import crd_pairs_page
    rows = {}
    for line in crd_pairs_page(REPO_ROOT).splitlines():
        cells = [c.strip().replace("\\*", "") for c in line.strip("|").split("|")]
        if len(cells) == 8 and " → " in cells[0]:
            rows[tuple(cells[0].split(" → "))] = cells[1:]

    def g(*values):
        return ", ".join(f"{v:g}" for v in values)
    for pair, want in TABLE.items():
        lf = want["wkd_lf"]
        assert rows[pair] == [g(want["lr"]), g(want["beta"]), g(*want["ls_kd"]), g(*want["ls_dkd"]), g(*want["wkd_l"]),
                              g(*want["wkd_f"]), f"{g(*lf[:2])}; {g(*lf[2:])}"], pair
