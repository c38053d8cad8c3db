"""Watching a run: the metrics plot (`plot`, metrics.svg) and Accelerate's trackers (`--log-with`)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from minigpt4.errors import ConfigError
from minigpt4.train import plot
from minigpt4.train.loop import METRICS, build_parser, train

pytest_plugins = ["train_helpers"]  # fixtures: tiny_data, tiny_config, one_thread
SVG = "{http://www.w3.org/2000/svg}"


def _polylines(svg_text: str) -> list[list[tuple[float, float]]]:
    root = ET.fromstring(svg_text)
    lines = []
    for node in root.iter(f"{SVG}polyline"):
        lines.append([tuple(map(float, p.split(","))) for p in node.get("points").split()])
    return lines


def _texts(svg_text: str) -> list[str]:
    return [node.text or "" for node in ET.fromstring(svg_text).iter(f"{SVG}text")]


def _rows(losses, lrs):
    return [
        {"step": i + 1, "loss": loss, "lr": lr} for i, (loss, lr) in enumerate(zip(losses, lrs, strict=True))
    ]


def test_the_plot_draws_each_logged_step_with_the_highest_loss_at_the_top():
    losses = [9.0, 7.5, 8.0, 5.0, 4.0]
    svg = plot.render_svg(_rows(losses, [1e-5, 1e-4, 1e-4, 8e-5, 5e-5]), title="run")
    loss_line, lr_line = _polylines(svg)
    assert len(loss_line) == len(lr_line) == 5
    xs = [x for x, _ in loss_line]
    assert xs == sorted(xs) and xs[0] == plot.MARGIN_L and xs[-1] == plot.MARGIN_L + plot.PANEL_W
    ys = [y for _, y in loss_line]  # SVG y grows downwards: the largest loss is the smallest y
    assert ys.index(min(ys)) == 0 and ys.index(max(ys)) == 4
    assert min(ys) == pytest.approx(plot.MARGIN_T) and max(ys) == pytest.approx(plot.MARGIN_T + plot.PANEL_H)
    assert ys[2] < ys[1]  # 8.0 above 7.5
    lr_ys = [y for _, y in lr_line]
    assert lr_ys.index(min(lr_ys)) in (1, 2) and lr_ys[0] == max(lr_ys)
    assert "run: loss (9.0000 → 4.0000)" in _texts(svg)


def test_ticks_are_round_and_span_the_range():
    assert plot.nice_ticks(0, 100) == [0, 20, 40, 60, 80, 100]
    assert plot.nice_ticks(3.7, 9.2) == [4, 5, 6, 7, 8, 9]
    ticks = plot.nice_ticks(1e-5, 3e-4)
    assert ticks[0] >= 1e-5 and ticks[-1] <= 3e-4 and 3 <= len(ticks) <= 8
    assert plot.nice_ticks(2.0, 2.0) == [2.0]


def test_the_plot_command_skips_cut_lines_and_names_what_is_missing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps(r) for r in _rows([3.0, 2.0, 1.5], [1e-4, 1e-4, 1e-4])]
    (run / METRICS).write_text("\n".join(lines) + '\n{"step": 4, "lo')  # the last line cut by a kill
    assert plot.main([str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"{run / plot.PLOT}: steps 1–3; loss 3.0000 → 1.5000"
    assert [len(line) for line in _polylines((run / plot.PLOT).read_text())] == [3, 3]

    assert plot.main([str(tmp_path / "nothere")]) == 1
    assert "no such file" in capsys.readouterr().err
    (run / METRICS).write_text("")
    assert plot.main([str(run), "--out", str(tmp_path / "x.svg")]) == 1
    assert "no metrics line yet" in capsys.readouterr().err


def test_a_run_writes_its_plot_and_logs_to_tensorboard(tiny_config, tmp_path, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: PLC0415

    out = tmp_path / "run"
    cfg = tiny_config(1, out, "run.iters_per_epoch=4", "run.save_every=0", "run.log_with=[tensorboard]")
    result = train(cfg)
    metrics = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert [m["loss"] for m in metrics] == pytest.approx(result.losses)
    loss_line, _ = _polylines((out / plot.PLOT).read_text())
    assert len(loss_line) == len(result.losses) == result.step

    events = list(out.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard events under {out}"
    scalars = {}
    for path in events:
        acc = EventAccumulator(str(path.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [e.value for e in acc.Scalars(tag)]
    assert scalars["train/loss"] == pytest.approx(result.losses, rel=1e-6)
    assert len(scalars["train/lr"]) == result.step


def test_trackers_are_checked_before_the_run_starts(tiny_config, tmp_path):
    with pytest.raises(
        ConfigError, match=r"run\.log_with: unknown tracker 'tensorbord' \(known: tensorboard"
    ):
        tiny_config(1, tmp_path / "a", "run.log_with=[tensorbord]")
    from accelerate.tracking import get_available_trackers  # noqa: PLC0415

    missing = next(
        n for n in ("wandb", "aim", "swanlab") if n not in {str(t) for t in get_available_trackers()}
    )
    cfg = tiny_config(1, tmp_path / "b", f"run.log_with=[{missing}]")
    with pytest.raises(ConfigError, match=rf"{missing} is not installed \(pip install {missing}\)"):
        train(cfg)
    assert not (tmp_path / "b").exists()  # nothing was built or written


def test_log_with_on_the_command_line_sets_the_config(capsys):
    args = build_parser().parse_args(["--cfg-path", "tiny_stage1", "--log-with", "tensorboard", "wandb"])
    assert args.log_with == ["tensorboard", "wandb"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--cfg-path", "tiny_stage1", "--log-with", "tensorbord"])
    assert "invalid choice: 'tensorbord'" in capsys.readouterr().err
