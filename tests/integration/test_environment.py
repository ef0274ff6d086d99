"""OUT/env.json: every grid records where it ran (kd2m.harness.environment), beside config.json."""
import json
import re

import torch

from kd2m.harness.cli import main
from kd2m.harness.environment import cpu_model, describe_environment, git_commit
from kd2m.harness.rundir import RunDir

KEYS = {"kd2m_version", "git_commit", "cpu_model", "cpu_count", "torch_version", "cpu_capability", "torch_threads",
        "cuda", "python_version", "platform"}


def test_describe_environment_names_versions_kernels_and_threads():
    import kd2m
    env = describe_environment()
    assert set(env) == KEYS
    assert env["kd2m_version"] == kd2m.__version__ and env["torch_version"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["git_commit"])
    json.dumps(env)  # plain JSON values only


def test_cpu_model_and_commit_fall_back_to_none(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Example CPU 9000\n")
    assert cpu_model(info) == "Example CPU 9000"
    assert git_commit(tmp_path) is None  # not inside a git checkout


def test_a_grid_writes_env_json_beside_config_json(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--baselines", "ce",
                 "--metrics", "", "--threads", "1", "--parallel", "1", "--no-progress", "--out", str(out)]) == 0
    d = RunDir(str(out))
    assert d.env_json == out / "env.json" and d.config_json.exists()
    env = json.loads(d.env_json.read_text())
    assert set(env) == KEYS and env["torch_threads"] == 1
