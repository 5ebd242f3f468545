"""MC-vs-GEN scatter of every method's calibration mixes with each method's Pareto frontier.

One panel per expert count (most experts first), one colour per method, the frontier drawn as the
staircase bounding its dominated area, frontier points labelled with their mix. Rows with method
'none' (the uncompressed model) are drawn as a black star in every panel. Writes <stem>.png and
<stem>.pdf. Uses matplotlib's object API (no pyplot), so no display or backend is needed.
A comparison over different task sets is refused (analysis.pareto) unless allow_mixed_task_sets,
and then every panel's title says so. Library module; `python -m analysis.report` calls it.
"""

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis.naming import method_label
from analysis.pareto import BASELINE, compared_points, pareto_front

PANEL_SIZE = (5.0, 4.2)  # inches per expert-count panel


def plot_frontiers(df: pd.DataFrame, out_stem, allow_mixed_task_sets: bool = False) -> list[Path]:
    """Draw the frontier figure and save it as out_stem.png and out_stem.pdf; returns both paths."""
    points = compared_points(df, allow_mixed_task_sets)
    baseline = df[(df["method"] == BASELINE) & df["mc"].notna() & df["gen"].notna()]
    experts = sorted(points["experts"].unique(), reverse=True) or [None]
    fig = Figure(figsize=(PANEL_SIZE[0] * len(experts), PANEL_SIZE[1]), layout="constrained")
    axes = fig.subplots(1, len(experts), squeeze=False)[0]
    colours = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(points["method"]))}
    for ax, count in zip(axes, experts):
        _draw_panel(ax, points[points["experts"] == count], colours, baseline, count)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8, loc="best")
    return _save(fig, Path(out_stem))


def _draw_panel(ax, points: pd.DataFrame, colours: dict, baseline: pd.DataFrame, experts) -> None:
    for method, group in points.groupby("method", sort=False):
        _draw_method(ax, group, colours[method], method_label(method))
    for i, (mc, gen) in enumerate(zip(baseline["mc"], baseline["gen"])):
        label = method_label(BASELINE) if i == 0 else "_nolegend_"
        ax.scatter([mc], [gen], marker="*", s=160, color="black", zorder=4, label=label)
    if points.empty:
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    title = f"{experts} experts" if experts is not None else ""
    if bool(points["mixed_task_sets"].any()):
        title += " (MIXED TASK SETS: not comparable)"
    ax.set_title(title)
    ax.set_xlabel("MC")
    ax.set_ylabel("GEN")
    ax.grid(alpha=0.3)


def _draw_method(ax, group: pd.DataFrame, colour: str, label: str) -> None:
    ax.scatter(group["mc"], group["gen"], color=colour, alpha=0.6, s=22, label=label)
    front = group.iloc[pareto_front(group[["mc", "gen"]].to_numpy())]
    # where="pre": between two frontier points the boundary sits at the right point's GEN,
    # i.e. the outline of the union of boxes [ref, p] (the hypervolume's area).
    ax.step(front["mc"], front["gen"], where="pre", color=colour, linewidth=1.5)
    ax.scatter(front["mc"], front["gen"], color=colour, s=36, edgecolors="black", linewidths=0.6)
    for mix, mc, gen in zip(front["mix"], front["mc"], front["gen"]):
        ax.annotate(mix, (mc, gen), textcoords="offset points", xytext=(3, 3), fontsize=6, color=colour)


def _save(fig: Figure, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + suffix) for suffix in (".png", ".pdf")]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1], metadata={"CreationDate": None})
    return paths
