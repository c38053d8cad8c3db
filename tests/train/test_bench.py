"""`bench train`: the three measurements run on the tiny config and the report is consistent."""

from __future__ import annotations

import json

import pytest

from minigpt4.train import bench as train_bench

pytest_plugins = ["train_helpers"]  # fixtures: tiny_data, tiny_config, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_train_reports_the_three_speeds_and_their_ratios(tiny_config, tmp_path, capsys, monkeypatch):
    cfg = tiny_config(1, tmp_path / "run")
    monkeypatch.setattr(train_bench, "prepare_training", lambda path, overrides: cfg)
    assert (
        train_bench.main(
            ["--cfg-path", "tiny_stage1", "--steps", "2", "--warmup", "1", "--rounds", "2", "--json"]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    for key in ("samples_per_s_cache", "samples_per_s_no_cache", "samples_per_s_llm_only", "peak_rss_mb"):
        assert report[key] > 0, key
    assert report["cache_speedup"] == pytest.approx(
        report["samples_per_s_cache"] / report["samples_per_s_no_cache"]
    )
    assert report["overhead_ratio"] == pytest.approx(report["step_ms_cache"] / report["step_ms_llm_only"])
    assert report["batch_size"] == 8 and report["steps"] == 2
    assert not (tmp_path / "run").exists(), "a benchmark writes no checkpoint"

    train_bench.main(["--cfg-path", "tiny_stage1", "--steps", "2", "--warmup", "0", "--rounds", "1"])
    table = capsys.readouterr().out
    assert "overhead ratio (cache ÷ LLM-only)" in table and "cached features" in table
