"""Shared pieces of the data and training tests: a tiny generated data set, tiny configs, a tiny model."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from minigpt4.commands import make_data
from minigpt4.train.config import TrainConfig, load_train_config

ROOT = Path(__file__).resolve().parents[2]

# Test modules use these with `pytest_plugins = ["train_helpers"]` (tests/conftest.py holds the ones every test may use).


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `make-data train` sets, smaller: 4 + 2 shards of 16 scenes, 24 stage-2 pairs."""
    out = tmp_path_factory.mktemp("tiny_data")
    make_data.main(["train", "--out", str(out), "--shards", "4", "--per-shard", "16", "--stage2", "24"])
    return out


def _tiny_config(stage: int, output_dir: Path, *overrides: str, data: Path) -> TrainConfig:
    if stage == 1:
        sources = (
            f"[{{name: shapes, path: '{data}/stage1/shapes', ratio: 115}}, "
            f"{{name: shapes_txt, path: '{data}/stage1/shapes_txt', ratio: 14}}]"
        )
    else:
        sources = f"[{{name: cc_sbu_align, path: '{data}/cc_sbu_align'}}]"
    return load_train_config(
        ROOT / "train_configs" / f"tiny_stage{stage}.yaml",
        [f"data.sources={sources}", f"run.output_dir={output_dir}", *overrides],
    )


@pytest.fixture(scope="session")
def tiny_config(tiny_data: Path) -> Callable[..., TrainConfig]:
    """`tiny_config(stage, output_dir, *overrides, data=tiny_data)`: train_configs/tiny_stage{1,2}.yaml."""
    return functools.partial(_tiny_config, data=tiny_data)


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one thread than on two oversubscribed ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tiny_config, tmp_path_factory: pytest.TempPathFactory):
    """The tiny training configs' model (both stages share it), on the CPU."""
    from minigpt4.build import build_model

    return build_model(tiny_config(1, tmp_path_factory.mktemp("unused")).model, device="cpu")
