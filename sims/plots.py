"""PNG plots of scenario results (matplotlib, headless)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

try:
    import matplotlib
except ImportError as missing:  # a plain install: the simulations run, the plots need an extra
    raise ImportError(
        "sims draws PNG plots with matplotlib, which a plain install lacks: "
        "pip install -e '.[sims]' (or '.[dev]')"
    ) from missing

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from sims.scenarios import ScenarioResult


def plot_result(result: ScenarioResult, path: Path) -> None:
    by_device: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for t, device, count in result.timeline:
        by_device[device].append((t, count))
    panels = (1 if by_device else 0) + len(result.series)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    series_axes = list(axes[0])
    if by_device:
        timeline = series_axes.pop(0)
        styles = ["-", "--", ":", "-."]
        for i, (device, points) in enumerate(sorted(by_device.items())):
            xs, ys = zip(*points, strict=True)
            timeline.step(
                xs, ys, where="post", label=device, linestyle=styles[i % len(styles)], linewidth=2
            )
        timeline.set_xlabel("virtual time (s)")
        timeline.set_ylabel("memories held")
        timeline.legend(fontsize="small")
    for ax, (name, series) in zip(series_axes, result.series.items(), strict=True):
        sx, sy = zip(*series, strict=True)
        ax.plot(sx, sy, marker="o")
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("devices")
    fig.suptitle(f"{result.name} (seed {result.seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
