"""Config loading: typed values, dotted overrides, and one-line errors naming the key."""
import subprocess
import sys

import pytest

from fedhpc.config import ConfigError, load_config
from fedhpc.strategies.fedit import FedITConfig

from conftest import REPO


def test_overrides_reach_nested_sections():
    cfg = load_config(REPO / "configs/quickstart.yaml",
                      ["strategy.name=ffa_lora", "data.partition.alpha=0.1", "train.local_epochs=3"])
    assert cfg.strategy.name == "ffa_lora" and type(cfg.strategy).__name__ == "FFALoRAConfig"
    assert cfg.data.partition.alpha == 0.1 and cfg.train.local_epochs == 3
    assert cfg.model.kwargs["embed_dim"] == 64  # untouched values survive


def test_default_strategy_is_typed():
    assert isinstance(load_config(None).strategy, FedITConfig)


@pytest.mark.parametrize("override, words", [
    (["train.local_epoch=2"], ["train.local_epoch", "train.local_epochs"]),
    (["strategy.name=fedavgg"], ["fedavgg", "fedit"]),
    (["data.name=cifar10"], ["cifar10", "cifar100"]),
    (["train.batch_size=big"], ["train.batch_size", "integer"]),
    (["rounds=0"], ["rounds", ">= 1"]),
    (["strategy.aggregate_heads=false"], ["strategy.aggregate_heads", "strategy.aggregate_head"]),
    (["data.partition.kind=dirichlett"], ["dirichlett", "dirichlet"]),
    (["checkpoint.keep=0"], ["checkpoint", "keep must be >= 1"]),
    (["checkpoint.evry=2"], ["checkpoint.evry", "checkpoint.every"]),
    (["model.kwargs={img_size:16,depth:2}"], ["model.kwargs", "'img_size:16'", "img_size: 16"]),
])
def test_bad_values_name_the_key_and_the_closest_valid_one(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/quickstart.yaml", override)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_cli_config_error_is_one_line_and_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedhpc", "run", str(REPO / "configs/quickstart.yaml"),
                           "train.lr=0.1", f"out_dir={tmp_path}"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.lr" in lines[0]
    assert not any(tmp_path.iterdir())


def test_missing_config_file_is_an_error():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/file.yaml")
