"""MC-vs-GEN scatter of every method's calibration mixes with each method's Pareto frontier.

One panel per expert count (most experts first), one colour per method, the frontier drawn as the
staircase bounding its dominated area, frontier points labelled with their mix (general:math:code),
each label put at the first of a few spots around its point where it overlaps no other label and no
point. Points with standard errors get error bars (± 1 SE in MC and in GEN). The uncompressed model is
a black star in every panel: rows with method 'none', and the baseline that runs' metrics.json carry
(columns baseline_mc / baseline_gen). Each panel's title names the model, the expert count (of how
many) and the eval (config name and limit). Writes <stem>.png and <stem>.pdf. Uses matplotlib's object
API (no pyplot), so no display or backend is needed.
A comparison over different eval settings is refused (analysis.pareto) unless allow_mixed_evals, and
then every panel's title says so; likewise runs that differ in other settings than the seed and the mix
(analysis.settings) unless allow_mixed_settings: then every title says so and each frontier point's label
carries its values of the settings that differ. Library module; `python -m analysis.report` calls it.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from analysis.naming import method_label
from analysis.pareto import BASELINE, compared_points, is_uncompressed, pareto_front

PANEL_SIZE = (5.6, 4.6)  # inches per expert-count panel
LABEL_SIZE = 6  # points
# Where a mix label may go, in points from its point, tried in order: next to it, then on rings of
# 16 directions further out, with a leader line back to the point.
NEAR = [(4, 4), (4, -4), (-4, 4), (-4, -4), (0, 8), (0, -8), (8, 0), (-8, 0)]
_ANGLES = np.linspace(0, 2 * np.pi, 16, endpoint=False) + np.pi / 4
FAR = [(round(r * np.cos(a), 1), round(r * np.sin(a), 1)) for r in (14, 22, 32, 44, 58) for a in _ANGLES]
MARKER_PX = 4  # half-width of the box kept free around each point, in pixels


def plot_frontiers(df: pd.DataFrame, out_stem, allow_mixed_evals: bool = False,
                   allow_mixed_settings: bool = False) -> list[Path]:
    """Draw the frontier figure and save it as out_stem.png and out_stem.pdf; returns both paths."""
    return _save(frontier_figure(df, allow_mixed_evals, allow_mixed_settings), Path(out_stem))


def frontier_figure(df: pd.DataFrame, allow_mixed_evals: bool = False, allow_mixed_settings: bool = False) -> Figure:
    """The frontier figure (see the module docstring), labels placed."""
    points = compared_points(df, allow_mixed_evals, allow_mixed_settings)
    baseline = baseline_points(df)
    experts = sorted(points["experts"].unique(), reverse=True) or [None]
    fig = Figure(figsize=(PANEL_SIZE[0] * len(experts), PANEL_SIZE[1]), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(experts), squeeze=False)[0]
    colours = method_colours(list(dict.fromkeys(points["method"])))
    labels = {}
    for ax, count in zip(axes, experts):
        labels[ax] = _draw_panel(ax, points[points["experts"] == count], colours, baseline, count)
        ax.set_title(panel_title(df, count, bool(points["mixed_evals"].any()),
                                 bool(points["mixed_settings"].any())), fontsize=9)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7, loc="lower left", title="labels: mix general:math:code", title_fontsize=7)
    fig.canvas.draw()  # the layout is final: label boxes can be measured in pixels
    renderer = fig.canvas.get_renderer()
    for ax, wanted in labels.items():
        place_labels(ax, wanted, renderer)
    fig.set_layout_engine("none")  # keep the measured positions when saving
    return fig


def baseline_points(df: pd.DataFrame) -> pd.DataFrame:
    """The uncompressed model's (mc, gen, mc_stderr, gen_stderr): rows of method 'none' and the
    baselines the runs carry, duplicates dropped."""
    rows = df[is_uncompressed(df)]
    own = pd.DataFrame({k: _column(rows, k) for k in ("mc", "gen", "mc_stderr", "gen_stderr")})
    carried = pd.DataFrame({k: _column(df, f"baseline_{k}") for k in ("mc", "gen", "mc_stderr", "gen_stderr")})
    both = pd.concat([own, carried], ignore_index=True)
    both = both[both["mc"].notna() & both["gen"].notna()]
    return both.round(6).drop_duplicates(["mc", "gen"]).reset_index(drop=True)


def panel_title(df: pd.DataFrame, experts, mixed: bool, mixed_settings: bool = False) -> str:
    """'toy-moe: 24 of 32 experts' and 'eval toy, limit 50' from the runs at that expert count."""
    scored = df[df["mc"].notna() & df["gen"].notna() & ~is_uncompressed(df)]
    rows = scored[scored["experts"] == experts] if experts is not None and "experts" in scored else scored.iloc[:0]
    models = _values(rows, "model")
    before = _values(rows, "experts_before")
    head = f"{experts} experts" if experts is not None else "no finished runs"
    if before and experts is not None:
        head = f"{experts} of {'/'.join(str(int(b)) for b in before)} experts"
    if models:
        head = f"{', '.join(models)}: {head}"
    evals = _values(rows, "eval")
    limits = [v for v in _values(rows, "eval_limit") if str(v) != "all"]
    tail = ""
    if evals or limits:
        tail = "eval " + (", ".join(evals) or "?") + (f", limit {'/'.join(map(str, limits))}" if limits else "")
    if mixed:
        tail += " (MIXED EVALS: not comparable)"
    if mixed_settings:
        tail += (" " if tail else "") + "(MIXED SETTINGS: not like with like)"
    return head + (f"\n{tail}" if tail else "")


def _values(rows: pd.DataFrame, column: str) -> list:
    if column not in rows:
        return []
    return [v if not isinstance(v, float) or v != int(v) else int(v) for v in dict.fromkeys(rows[column].dropna())]


def _column(df: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(df[column], errors="coerce") if column in df else pd.Series(np.nan, index=df.index)


def method_colours(methods: list) -> dict:
    """One colour per method: matplotlib's ten default colours, or tab20's twenty when more methods are compared
    (the toy sweep's merge operators and scores), so that no two frontiers share one up to 20."""
    if len(methods) <= 10:
        return {m: f"C{i}" for i, m in enumerate(methods)}
    from matplotlib import colormaps

    tab20 = colormaps["tab20"]
    return {m: tab20(i % 20) for i, m in enumerate(methods)}


def _draw_panel(ax, points: pd.DataFrame, colours: dict, baseline: pd.DataFrame, experts) -> list:
    """Draws the points, error bars, frontiers and baseline; returns the labels to place."""
    labels = []
    for method, group in points.groupby("method", sort=False):
        labels += _draw_method(ax, group, colours[method], method_label(method))
    _error_bars(ax, baseline, "black")
    for i, (mc, gen) in enumerate(zip(baseline["mc"], baseline["gen"])):
        label = f"{method_label(BASELINE)} (uncompressed)" if i == 0 else "_nolegend_"
        ax.scatter([mc], [gen], marker="*", s=160, color="black", zorder=4, label=label)
    if points.empty:
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("MC")
    ax.set_ylabel("GEN")
    ax.grid(alpha=0.3)
    ax.margins(0.08)
    return labels


def _draw_method(ax, group: pd.DataFrame, colour: str, label: str) -> list:
    _error_bars(ax, group, colour)
    ax.scatter(group["mc"], group["gen"], color=colour, alpha=0.6, s=22, label=label)
    front = group.iloc[pareto_front(group[["mc", "gen"]].to_numpy())]
    # where="pre": between two frontier points the boundary sits at the right point's GEN,
    # i.e. the outline of the union of boxes [ref, p] (the hypervolume's area).
    ax.step(front["mc"], front["gen"], where="pre", color=colour, linewidth=1.5)
    ax.scatter(front["mc"], front["gen"], color=colour, s=36, edgecolors="black", linewidths=0.6)
    return [(f"{mix} [{setting}]" if setting else mix, (mc, gen), colour)
            for mix, mc, gen, setting in zip(front["mix"], front["mc"], front["gen"], front["setting"])]


def _error_bars(ax, rows: pd.DataFrame, colour: str) -> None:
    """± 1 standard error in MC and GEN for the rows that have one (NaN bars are not drawn)."""
    if rows.empty or "mc_stderr" not in rows:
        return
    xerr, yerr = rows["mc_stderr"].to_numpy(float), rows["gen_stderr"].to_numpy(float)
    known = np.isfinite(xerr) | np.isfinite(yerr)
    if known.any():
        ax.errorbar(rows["mc"].to_numpy(float)[known], rows["gen"].to_numpy(float)[known],
                    xerr=np.nan_to_num(xerr[known]), yerr=np.nan_to_num(yerr[known]), fmt="none",
                    ecolor=colour, elinewidth=0.7, capsize=1.5, alpha=0.6, zorder=1)


def place_labels(ax, labels: list, renderer) -> list:
    """Annotates each (text, (x, y), colour) at the first spot around its point whose box overlaps
    no label placed before, no point of the panel and stays inside the axes; returns the annotations.
    A label with no free spot goes to the first one anyway (and is listed as crowded in its gid)."""
    to_pixels = ax.transData.transform
    xy = np.array([o for c in ax.collections for o in c.get_offsets()] or np.empty((0, 2)), dtype=float)
    xy = xy[np.isfinite(xy).all(axis=1)] if len(xy) else xy
    taken = [Bbox.from_extents(*(p - MARKER_PX), *(p + MARKER_PX)) for p in to_pixels(xy)] if len(xy) else []
    frame = ax.get_window_extent(renderer)
    placed = []
    spots = NEAR + FAR
    for text, point, colour in labels:
        for i, (dx, dy) in enumerate(spots + [NEAR[0]]):
            crowded = i == len(spots)
            note = ax.annotate(text, point, xytext=(dx, dy), textcoords="offset points", fontsize=LABEL_SIZE,
                               color=colour, ha="left" if dx >= 0 else "right", va="bottom" if dy >= 0 else "top",
                               arrowprops=None if i < len(NEAR) or crowded else
                               dict(arrowstyle="-", color=colour, lw=0.4, alpha=0.6), zorder=5)
            note.update_positions(renderer)
            box = Text.get_window_extent(note, renderer)  # the text alone, not its leader line
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if crowded or (inside and not any(box.overlaps(other) for other in taken)):
                note.set_gid("crowded" if crowded else "placed")
                taken.append(box)
                placed.append(note)
                break
            note.remove()
    return placed


def _save(fig: Figure, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + suffix) for suffix in (".png", ".pdf")]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1], metadata={"CreationDate": None})
    return paths
