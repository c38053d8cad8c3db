"""`python -m minigpt4 plot RUN_DIR`: the loss and learning-rate curves of a run, as one SVG.

Training writes `metrics.svg` beside `metrics.jsonl` each time it stops; this command draws it again
for a finished or running run. The SVG is written by hand (two panels, axes with ticks, one polyline
each), so it needs no plotting package and opens in any browser.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

from minigpt4.commands.common import HelpFormatter
from minigpt4.files import write_text_atomic

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
PLOT = "metrics.svg"
PANEL_W, PANEL_H = 560, 200  # the plotting area of one panel, in px
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 70, 20, 30, 40


class PlotError(ValueError):
    """There is nothing to plot (no metrics file, no readable line); the message says which."""


@dataclass(frozen=True)
class Curve:
    name: str
    steps: list[int]
    values: list[float]


def read_metrics(path: str | Path) -> list[dict]:
    """The readable lines of a metrics.jsonl (a line cut short by a killed run is skipped)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    if not path.is_file():
        raise PlotError(f"{path}: no such file (train writes it in run.output_dir)")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    if not rows:
        raise PlotError(f"{path}: no metrics line yet")
    return rows


def curves(rows: Sequence[dict], names: Sequence[str] = ("loss", "lr")) -> list[Curve]:
    out = []
    for name in names:
        points = [(r["step"], float(r[name])) for r in rows if _finite(r.get(name))]
        out.append(Curve(name, [s for s, _ in points], [v for _, v in points]))
    return out


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values spanning [low, high] (1, 2 or 5 × a power of ten apart)."""
    if not high > low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 5, 10)), key=lambda candidate: abs(math.log(candidate / raw)))
    first = math.ceil(low / step - 1e-9) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) < 1e-2 or abs(value) >= 1e5:
        return f"{value:.1e}"
    return f"{value:.4g}"


def _panel(curve: Curve, top: float, step_range: tuple[int, int], title: str) -> list[str]:
    """The SVG elements of one panel whose plotting area starts `top` px from the top."""
    left = MARGIN_L
    parts = [
        f'<text x="{left}" y="{top - 10:.0f}" font-size="14" font-weight="bold">{escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#999"/>',
    ]
    if not curve.values:
        parts.append(
            f'<text x="{left + 10}" y="{top + 20}" font-size="12">no {escape(curve.name)} logged</text>'
        )
        return parts
    s0, s1 = step_range
    lo, hi = min(curve.values), max(curve.values)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - max(abs(lo) * 0.05, 1e-12), hi + max(abs(hi) * 0.05, 1e-12)
    span_s = max(s1 - s0, 1)

    def x(step: float) -> float:
        return left + (step - s0) / span_s * PANEL_W

    def y(value: float) -> float:
        return top + PANEL_H - (value - lo) / (hi - lo) * PANEL_H

    for tick in nice_ticks(lo, hi):
        if lo <= tick <= hi:
            parts.append(
                f'<line x1="{left}" x2="{left + PANEL_W}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#eee"/>'
            )
            parts.append(
                f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" font-size="11" text-anchor="end">{_label(tick)}</text>'
            )
    for tick in nice_ticks(s0, s1):
        if s0 <= tick <= s1:
            parts.append(
                f'<text x="{x(tick):.1f}" y="{top + PANEL_H + 16}" font-size="11" text-anchor="middle">'
                f"{int(tick)}</text>"
            )
    points = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(curve.steps, curve.values, strict=True))
    parts.append(f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
    return parts


def render_svg(rows: Sequence[dict], title: str = "") -> str:
    """Loss and learning rate against the step, two panels stacked, as an SVG document."""
    loss, lr = curves(rows)
    steps = [r["step"] for r in rows]
    step_range = (min(steps), max(steps))
    height = 2 * (PANEL_H + MARGIN_T + MARGIN_B)
    width = MARGIN_L + PANEL_W + MARGIN_R
    first_last = f" ({loss.values[0]:.4f} → {loss.values[-1]:.4f})" if loss.values else ""
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" viewBox="0 0 {width} {height}">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        *_panel(loss, MARGIN_T, step_range, f"{title + ': ' if title else ''}loss{first_last}"),
        *_panel(lr, 2 * MARGIN_T + PANEL_H + MARGIN_B, step_range, "learning rate"),
        f'<text x="{MARGIN_L + PANEL_W / 2}" y="{height - 8}" font-size="12" text-anchor="middle">step</text>',
        "</svg>",
    ]
    return "\n".join(parts) + "\n"


def write_plot(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, list[dict]]:
    """Draw `<run_dir>/metrics.jsonl` into `out` (default `<run_dir>/metrics.svg`); returns the path
    and the metrics lines it drew."""
    run_dir = Path(run_dir)
    metrics = run_dir if run_dir.is_file() else run_dir / METRICS
    rows = read_metrics(metrics)
    out = Path(out) if out is not None else metrics.parent / PLOT
    write_text_atomic(out, render_svg(rows, title=metrics.parent.name))
    return out, rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter, prog="python -m minigpt4 plot", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run", help="a run folder (run.output_dir) or its metrics.jsonl")
    parser.add_argument(
        "--out", default=None, help="the SVG to write (default: metrics.svg beside metrics.jsonl)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out, rows = write_plot(args.run, args.out)
    except PlotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    loss = curves(rows, ("loss",))[0]
    summary = f"; loss {loss.values[0]:.4f} → {loss.values[-1]:.4f}" if loss.values else ""
    print(f"{out}: steps {rows[0]['step']}–{rows[-1]['step']}{summary}")
    return 0
