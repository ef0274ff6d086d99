"""`kd2m bench CONFIG --dry-run`: the reproduction card — every method's effective settings and
where each comes from — printed without training or writing anything."""

from kd2m.harness.cli import main

from helpers import REPO_ROOT

ROOT = REPO_ROOT


def _card(argv, capsys):
    assert main(argv) == 0
    return capsys.readouterr().out


def _row(card: str, student: str, term: str) -> str:
    """The table row of ``term`` under the ``### student`` heading."""
    section = card.split(f"\n### {student} — ", 1)[1].split("\n### ", 1)[0]
    return next(line for line in section.splitlines() if line.startswith(f"| {term} ("))


def test_the_crd_card_says_what_runs_and_where_it_comes_from(tmp_path, capsys):
    out = tmp_path / "never"
    card = _card(["bench", str(ROOT / "configs/crd/resnet32x4_resnet8x4.yaml"), "--dry-run", "--out", str(out)],
                 capsys)
    assert not out.exists()  # nothing written, nothing trained
    assert "| epochs | 240 | config |" in card and "| lr_milestones | [150, 180, 210] | config |" in card
    assert "| momentum | 0.9 | config |" in card          # given in the file, though equal to kd2m's default
    assert "| seeds | [0, 1, 2] | dataset default |" in card
    dkd = _row(card, "dkd", "dkd")
    assert "beta=8 (config)" in dkd and "alpha=1.0 (authors' default)" in dkd and "warm-up 20 epochs (authors' default)" in dkd
    assert "| 2 (config) |" in _row(card, "dist", "dist") and "temperature=4 (config)" in _row(card, "dist", "dist")
    assert "CE weight 0.1 (authors' default)" in card.split("### kd — ", 1)[1].split("###", 1)[0]
    assert "layer1+layer2+layer3 ← layer1+layer2+layer3 (stages after the stem: default)" in _row(card, "at", "at")
    assert "layer2 ← layer2 (stage 2 (hint): default)" in _row(card, "fitnet", "fitnet")
    assert "layer3 ← layer3 (last stage: default)" in _row(card, "wkd_f", "wkd_f")
    assert "cosine_after:150 (config)" in _row(card, "wkd_f", "wkd_f")
    assert "auto×1 (config)" in _row(card, "cw2", "cw2")


def test_the_default_grid_card_names_its_dataset_defaults(tmp_path, capsys):
    card = _card(["run", "--dry-run", "--out", str(tmp_path / "x")], capsys)
    assert not (tmp_path / "x").exists()
    assert "| teacher | digits_cnn | dataset default |" in card and "| dataset | digits | kd2m default |" in card
    assert "0.1 (dataset default)" in _row(card, "cw2", "cw2")
    assert "ridge=0.1 (dataset default)" in _row(card, "gauss_kl", "gauss_kl")
    assert "penultimate ← penultimate (kd2m default)" in _row(card, "w2", "w2")


def test_a_per_token_distance_s_default_layer_is_named_as_the_hidden_states_it_reads(tmp_path, capsys):
    # a language model's distances read the last hidden states token by token, not a feature map
    card = _card(["run", "--task", "lm", "--metrics", "gauss_w2", "--baselines", "ce", "--select-k", "none",
                  "--dry-run", "--out", str(tmp_path / "never")], capsys)
    assert _row(card, "gauss_w2", "gauss_w2").endswith("| penultimate ← penultimate (last hidden states, per token: "
                                                       "default) |")
    digits = _card(["run", "--metrics", "gauss_w2", "--unit", "spatial", "--baselines", "ce", "--dry-run",
                    "--out", str(tmp_path / "never")], capsys)
    assert "(last post-activation map: default) |" in _row(digits, "gauss_w2", "gauss_w2")
