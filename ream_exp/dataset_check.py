"""Are the hub datasets a run needs there, before the weights load? In the local cache, or reachable.

    check_datasets([("calib.sources.general", ("allenai/c4", "en", None)), ("eval task mmlu", ("cais/mmlu", ...))])

A dataset counts as present when `datasets` could load it offline: a prepared copy of that config in the
datasets cache (<HF_DATASETS_CACHE>/<namespace>___<name>/<config>/<version>/<hash>/dataset_info.json,
the layout `datasets` falls back to when the hub cannot be reached). Otherwise, when not offline
(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), its hub page is asked for (dataset_info, and the access check for
gated datasets) with a short timeout. Nothing is downloaded. One ConfigError names every dataset missing.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .config import ConfigError

TIMEOUT_S = 10.0


def is_cached(repo_id: str, name: str | None, cache_dir: str | Path | None = None) -> bool:
    import datasets
    from datasets.naming import camelcase_to_snakecase

    namespace, _, dataset = repo_id.rpartition("/")
    folder = "___".join(p for p in (namespace, camelcase_to_snakecase(dataset)) if p)
    root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE).expanduser() / folder
    return any(root.glob(f"{name or '*'}/*/*/dataset_info.json"))


def is_offline() -> bool:
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def unreachable_reason(repo_id: str, revision: str | None) -> str | None:
    """Why the hub dataset cannot be read from here, or None when it can (metadata only, no download)."""
    from huggingface_hub import HfApi, auth_check

    try:
        info = HfApi().dataset_info(repo_id, revision=revision, timeout=TIMEOUT_S)
        if info.gated:
            auth_check(repo_id, repo_type="dataset")
    except Exception as exc:  # no network, no such repo or revision, gated without access: all mean "not here"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    return None


def _label(repo_id: str, names: list, users: list) -> str:
    """'cais/mmlu (anatomy, astronomy +55 more) for eval task mmlu', 'x (a, b) for eval task a, b'."""
    configs = sorted({n for n in names if n})
    shown = ", ".join(configs[:3]) + (f" +{len(configs) - 3} more" if len(configs) > 3 else "")
    by_kind: dict[str, list] = {}  # "eval task a", "eval task b" -> {"eval task": [a, b]}
    for user in dict.fromkeys(users):
        kind, _, what = user.rpartition(" ")
        by_kind.setdefault(kind, []).append(what)
    needs = "; ".join(f"{kind} {', '.join(whats)}".strip() for kind, whats in by_kind.items())
    return f"{repo_id}{f' ({shown})' if shown else ''} for {needs}"


def _not_cached(needed) -> dict[tuple, tuple[list, list]]:
    """{(hub id, revision): (config names, who needs them)} of the needed datasets missing from the cache."""
    missing: dict[tuple, tuple[list, list]] = {}
    for user, (repo_id, name, revision) in needed:
        if not is_cached(repo_id, name):
            configs, users = missing.setdefault((repo_id, revision), ([], []))
            configs.append(name)
            users.append(user)
    return missing


def _unreachable(keys: list[tuple]) -> dict[tuple, str]:
    """{(hub id, revision): why} for those the hub does not serve here (all of them when offline)."""
    if is_offline():
        return {key: "offline" for key in keys}
    with ThreadPoolExecutor(max_workers=8) as pool:  # a few metadata requests, each with a short timeout
        found = pool.map(lambda key: unreachable_reason(*key), keys)
        return {key: why for key, why in zip(keys, found) if why is not None}


def check_datasets(needed: Iterable[tuple[str, tuple]]) -> None:
    """Raises one ConfigError naming each needed dataset that is neither cached nor reachable.

    `needed`: (who needs it, (hub id, config name or None, revision or None)) pairs.
    """
    missing = _not_cached(needed)
    reasons = _unreachable(list(missing)) if missing else {}
    if not reasons:
        return
    offline = "offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set) and not"
    where = offline if is_offline() else "neither reachable nor"
    listed = " | ".join(_label(repo, *missing[(repo, rev)]) + ("" if why == "offline" else f" [{why}]")
                        for (repo, rev), why in reasons.items())
    raise ConfigError(f"dataset(s) {where} in the datasets cache: {listed}; go online (and `hf auth login` for "
                      "gated ones) or cache them first, or choose other calib / eval settings")
