"""The runs of a W&B project as table rows (the same columns as run directories give: analysis.rows).

A W&B run's config and summary are nested again from their flat keys ('eval/mc', 'calib.mix'); its
status is the summary's "status", else its W&B state (finished -> done; failed, crashed, killed ->
failed). Reading a project needs network access and a login (WANDB_API_KEY).
"""

import pandas as pd

from analysis.rows import make_row, to_frame

# W&B run states -> our status, used when the run's summary does not say.
WANDB_STATES = {"finished": "done", "failed": "failed", "crashed": "failed", "killed": "failed"}


def collect_wandb(project: str, entity: str | None = None, filters: dict | None = None) -> pd.DataFrame:
    """One row per run of a W&B project (same columns as collect_runs). Needs network + login."""
    if not project:
        raise ValueError("collect_wandb needs a W&B project name")
    path = f"{entity}/{project}" if entity else project
    try:
        import wandb

        rows = [wandb_row(run) for run in wandb.Api().runs(path, filters=filters)]
    except Exception as exc:  # wandb raises many types (CommError, UsageError, HTTP, ValueError)
        raise RuntimeError(
            f"could not read the W&B project {path!r} ({type(exc).__name__}: {exc}). W&B needs "
            "network access and a login (WANDB_API_KEY); offline, use collect_runs on the run dirs."
        ) from exc
    return to_frame(rows)


def wandb_row(run) -> dict:
    """Map a wandb.apis.public.Run (or any object with config, summary_metrics/summary, state)."""
    config = unflatten(_unwrap_values(dict(run.config or {})), separators="/.")
    summary = getattr(run, "summary_metrics", None)
    summary = unflatten(dict(summary if summary is not None else run.summary or {}), separators="/")
    state = str(getattr(run, "state", "") or "")
    status = str(summary.get("status") or WANDB_STATES.get(state, state or "unknown"))
    path = getattr(run, "path", None)
    run_dir = "wandb:" + ("/".join(path) if path else str(getattr(run, "id", "?")))
    return make_row(config, summary, run_dir=run_dir, status=status, error=summary.get("error"))


def _unwrap_values(config: dict) -> dict:
    """Raw W&B configs store {"key": {"value": v, "desc": ...}}; keep only v."""
    def unwrap(v):
        return v["value"] if isinstance(v, dict) and set(v) <= {"value", "desc"} and "value" in v else v
    return {key: unwrap(value) for key, value in config.items()}


def unflatten(flat: dict, separators: str = "/") -> dict:
    """{'eval/mc': x, 'eval': {'gen': y}} -> {'eval': {'mc': x, 'gen': y}}; keys starting with _ dropped."""
    tree: dict = {}
    for key, value in flat.items():
        if str(key).startswith("_"):
            continue
        parts = _split(str(key), separators)
        if isinstance(value, dict):
            value = unflatten(value, separators)
        _insert(tree, parts, value)
    return tree


def _split(key: str, separators: str):
    for sep in separators[1:]:
        key = key.replace(sep, separators[0])
    return key.split(separators[0])


def _insert(tree: dict, parts, value):
    for part in parts[:-1]:
        if not isinstance(tree.get(part), dict):
            tree[part] = {}
        tree = tree[part]
    leaf = parts[-1]
    if isinstance(value, dict) and isinstance(tree.get(leaf), dict):
        tree[leaf].update(value)
    else:
        tree[leaf] = value
