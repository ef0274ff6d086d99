"""A ViT teacher → CNN student end to end through the CLI: penultimate ↔ penultimate
across widths (a learnable projector), and a token layer ↔ a conv layer with unit spatial, on
the embedded digits. timm's `test_vit` with patch 2 reads 8×8 images as 16 tokens + a class token."""
import json

from kd2m.harness.cli import main

CONFIG = """
teacher: timm:test_vit
teacher_options: {{patch_size: 2, embed_dim: 32}}
student: digits_cnn
epochs: 1
teacher_epochs: 1
seeds: [0]
baselines: [ce]
metrics: [gauss_w2]
students:
  tokens_to_map:
    - {{term: gauss_w2, teacher_layer: blocks.1, student_layer: features.8, unit: spatial, weight: 0.01}}
    - {{term: cw2, weight: 0.1}}
out: {out}
progress: false
"""


def test_vit_teacher_cnn_student(tmp_path, capsys):
    cfg = tmp_path / "vit.yaml"
    cfg.write_text(CONFIG.format(out=tmp_path / "r"))
    assert main(["bench", str(cfg)]) == 0
    out = tmp_path / "r"
    pen = json.loads((out / "gauss_w2/seed0/final.json").read_text())["settings"]
    assert pen["teacher"] == "timm:test_vit" and pen["teacher_options"] == {"patch_size": 2, "embed_dim": 32}
    log = [json.loads(x) for x in (out / "gauss_w2/seed0/log.jsonl").read_text().splitlines()]
    assert log[0]["terms"]["gauss_w2"] > 0  # 64-d student features projected onto the 32-d teacher's
    pair = [json.loads(x) for x in (out / "tokens_to_map/seed0/log.jsonl").read_text().splitlines()]
    assert pair[0]["terms"]["gauss_w2"] > 0 and pair[0]["terms"]["cw2"] > 0  # each pair's distance, logged
    assert pair[0]["loss"] > pair[0]["ce"]
    printed = capsys.readouterr().out
    assert "W2 (G) + CW2 (E)" in printed


def test_torchvision_student_by_name_through_the_cli(tmp_path):
    """`--student torchvision:NAME`: any torchvision classifier, random init, first conv adapted to
    1-channel digits; its 1024-d penultimate features are projected onto the teacher's 64."""
    out = tmp_path / "tv"
    assert main(["run", "--student", "torchvision:mobilenet_v3_small", "--metrics", "gauss_w2", "--baselines", "ce",
                 "--epochs", "1", "--teacher-epochs", "1", "--seeds", "0", "--out", str(out), "--no-progress"]) == 0
    final = json.loads((out / "gauss_w2/seed0/final.json").read_text())
    assert final["settings"]["model"] == "torchvision:mobilenet_v3_small" and 0.0 <= final["test_acc"] <= 1.0
    log = json.loads((out / "gauss_w2/seed0/log.jsonl").read_text().splitlines()[0])
    assert log["terms"]["gauss_w2"] > 0
