"""recipes/lite.sh, end to end at its smoke size: every stage runs, prints its wall time, and a rerun
skips what is done."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]
STAGES = (
    "closed questions and stage-1 captions",
    "stage 1",
    "teacher answers",
    "curate generate",
    "curate refine",
    "curate filter and export",
    "stage-2 mixture",
    "stage 2",
)


def _run(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "SMOKE": "1",
        "OUT": str(tmp_path / "lite"),
        "RUNS": str(tmp_path / "runs"),
        "THREADS": "1",
    }
    return subprocess.run(
        ["bash", str(ROOT / "recipes" / "lite.sh")], env=env, capture_output=True, text=True, timeout=1500
    )


@pytest.mark.slow
def test_the_lite_recipe_runs_every_stage_and_a_rerun_skips_them(tmp_path: Path) -> None:
    first = _run(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in STAGES:
        assert re.search(rf"^== {re.escape(stage)}.*: \d+ min \d+ s$", first.stdout, re.MULTILINE), stage
    result = tmp_path / "runs" / "lite_stage2" / "projection.safetensors"
    with safe_open(str(result), framework="pt") as f:
        keys = list(f.keys())
    assert "llama_proj.weight" in keys and any("lora_A" in k for k in keys)
    # The curated descriptions were refined against the scenes' facts.
    refined = (tmp_path / "lite" / "curate" / "refine.jsonl").read_text()
    assert '"facts": "The image shows' in refined
    mixture = (tmp_path / "lite" / "mix" / "counts.json").read_text()
    assert all(name in mixture for name in ("closed", "teach_a", "teach_b", "curated"))
    again = _run(tmp_path)
    assert again.returncode == 0
    assert again.stdout.count("done before") == len(STAGES)


def test_the_recipes_stage_2_trains_the_adapters_the_default_preset_loads():
    """The recipe ships its stage-2 file as the preset's checkpoint: the LoRA shapes must agree."""
    import dataclasses

    import yaml

    from minigpt4.config import load_preset

    trained = yaml.safe_load((ROOT / "train_configs" / "lite_stage2.yaml").read_text())["model"]["lora"]
    shipped = dataclasses.asdict(load_preset("minigpt4_lite").model.lora)
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in shipped.items()} == trained
