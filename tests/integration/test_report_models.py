"""`kd2m report` and `kd2m bound` rebuild the models of a run with their options."""
from helpers import ONE_EPOCH_GRID, run_cli


def test_report_and_bound_rebuild_models_with_their_options(tmp_path, capsys):
    """The README's ViT→CNN run: `kd2m bound`/`report` rebuilt the ViT without its patch_size."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"out: {tmp_path / 'o'}\nteacher: timm:test_vit\nteacher_options: {{patch_size: 2}}\n"
                   "student: digits_cnn\nmetrics: [gauss_w2]\nbaselines: [ce]\nteacher_cache: 0\n")
    assert run_cli(["bench", cfg, *ONE_EPOCH_GRID], capsys)[0] == 0
    code, _, err = run_cli(["bound", tmp_path / "o"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["report", tmp_path / "o"], capsys)
    assert code == 0, err
