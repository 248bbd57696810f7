"""The report's figure: test top-1 along the fine-tuning schedule, per arm.

Every full-label fine-tune records its test top-1 after the protocol's ``ft_eval_at_epochs``
(its ``curve``); the figure draws each unit thin and the arm's mean thick, so a reader sees
whether an ordering at the final budget already held earlier, and how far the units spread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ...io.plots import pyplot
from .arms import ARMS, stage_of
from .verdicts import n_units, unit_result


def ft_curves(results: Path, protocol: dict) -> dict[str, list[list[tuple[int, float]]]]:
    """Arm -> the curves ([(epoch, test top-1)]) of its finished full-label fine-tunes."""
    out: dict[str, list[list[tuple[int, float]]]] = {}
    for arm in ("random", *ARMS):
        for seed in range(n_units(protocol, arm)):
            r = unit_result(results, arm, seed, "ft")
            if r and r.get("curve"):
                out.setdefault(arm, []).append([(int(e), float(v)) for e, v in r["curve"]])
    return out


def _draw(ax, units: list, color: str, label: str, ref: bool = False) -> None:
    for c in units:
        ax.plot(*zip(*c), color=color, lw=0.7, alpha=0.2 if ref else 0.45)
    epochs = sorted({e for c in units for e, _ in c})
    mean = [
        sum(v for c in units for e, v in c if e == x)
        / sum(1 for c in units for e, _ in c if e == x)
        for x in epochs
    ]
    ax.plot(
        epochs,
        mean,
        color=color,
        lw=1.4 if ref else 2.2,
        marker="o",
        ms=3,
        ls="--" if ref else "-",
        label=f"{label} ({len(units)})",
    )


def plot_ft_curves(results: Path, protocol: dict, out: Path) -> Optional[Path]:
    """Draw :func:`ft_curves` into ``out`` (PNG), one panel per stage with random init and MAE
    as dashed references; None when no fine-tune has finished."""
    curves = ft_curves(results, protocol)
    if not curves:
        return None
    panels: dict[str, list[str]] = {}
    for arm in curves:
        panels.setdefault(stage_of(arm), []).append(arm)
    plt = pyplot()
    n = len(panels)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    refs = {"random": "0.35", "mae": "0.6"}
    ticks = sorted({e for units in curves.values() for c in units for e, _ in c})
    for ax, (stage, arms) in zip(axes.flat, panels.items()):
        for arm, color in refs.items():
            if arm in curves and arm not in arms:
                _draw(ax, curves[arm], color, arm, ref=True)
        for i, arm in enumerate(arms):
            _draw(ax, curves[arm], f"C{i % 10}", arm)
        ax.set_title(f"stage {stage}", fontsize=10)
        ax.set_xticks(ticks)
        ax.set_xlabel("fine-tuning epochs")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
