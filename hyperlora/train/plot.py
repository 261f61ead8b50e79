"""Loss curves: ``loss.csv`` (step, stage, scenario, loss, lr) -> ``loss.png``.

matplotlib draws the plot when it is installed; otherwise a small PIL plot (PIL is a dependency of the
pack already), so training never needs a plotting library.  One line per scenario, log-scaled loss,
a running mean over ``smooth`` steps, vertical marks where the stage changes.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from pathlib import Path

log = logging.getLogger(__name__)

COLOURS = {"recon": (31, 119, 180), "id_only": (255, 127, 14), "base_id": (44, 160, 44), "base": (214, 39, 40),
           "distill": (148, 103, 189)}


def read_losses(path: Path) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[int, str]]]:
    """``({scenario: [(step, loss), ...]}, [(first step, stage), ...])`` from a loss.csv."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    stages: list[tuple[int, str]] = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step, loss = int(row["step"]), float(row["loss"])
            if not stages or stages[-1][1] != row["stage"]:
                stages.append((step, row["stage"]))
            if math.isfinite(loss) and loss > 0:
                series[row["scenario"]].append((step, loss))
    return dict(series), stages


def _smooth(points: list[tuple[int, float]], n: int) -> list[tuple[int, float]]:
    out, acc = [], []
    for s, v in points:
        acc.append(math.log10(v))
        if len(acc) > n:
            acc.pop(0)
        out.append((s, 10 ** (sum(acc) / len(acc))))
    return out


def plot_losses(csv_path: str | Path, png_path: str | Path, *, smooth: int = 20) -> Path | None:
    """Draw ``csv_path`` into ``png_path``; None when there is nothing to plot yet."""
    csv_path, png_path = Path(csv_path), Path(png_path)
    if not csv_path.is_file():
        return None
    series, stages = read_losses(csv_path)
    if not series:
        return None
    series = {k: _smooth(v, smooth) for k, v in series.items()}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(series, stages, png_path)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for name, pts in sorted(series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name,
                color=tuple(c / 255 for c in COLOURS.get(name, (0, 0, 0))))
    for step, stage in stages[1:]:
        ax.axvline(step, color="gray", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (running mean of {smooth})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def _plot_pil(series: dict[str, list[tuple[int, float]]], stages: list[tuple[int, str]], png_path: Path,
              size: tuple[int, int] = (800, 450)) -> Path:
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 60, 20, 20, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    steps = [p[0] for pts in series.values() for p in pts]
    logs = [math.log10(p[1]) for pts in series.values() for p in pts]
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(logs), max(logs)
    if y1 - y0 < 1e-6:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def xy(s: int, v: float) -> tuple[float, float]:
        x = left + (s - s0) / (s1 - s0) * (w - left - right)
        y = top + (y1 - math.log10(v)) / (y1 - y0) * (h - top - bottom)
        return x, y

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for step, stage in stages:
        x = xy(step, 10 ** y1)[0]
        d.line([x, top, x, h - bottom], fill=(180, 180, 180))
        d.text((x + 3, top + 2), f"stage {stage}", fill=(100, 100, 100))
    for j, (name, pts) in enumerate(sorted(series.items())):
        colour = COLOURS.get(name, (0, 0, 0))
        if len(pts) > 1:
            d.line([xy(s, v) for s, v in pts], fill=colour, width=2)
        else:
            x, y = xy(*pts[0])
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        d.text((w - right - 90, top + 14 + 12 * j), name, fill=colour)
    d.text((left, h - bottom + 8), f"step {s0}", fill="black")
    d.text((w - right - 70, h - bottom + 8), f"step {s1}", fill="black")
    d.text((4, top), f"{10 ** y1:.3g}", fill="black")
    d.text((4, h - bottom - 12), f"{10 ** y0:.3g}", fill="black")
    d.text((left + 4, h - 16), "loss (log scale, running mean)", fill="black")
    img.save(png_path)
    return png_path


__all__ = ["plot_losses", "read_losses"]
