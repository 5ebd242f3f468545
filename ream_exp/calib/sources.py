"""Read raw calibration texts from a source: a local text/JSONL/JSON/parquet file or a hub dataset.

Both go through `datasets.load_dataset`, so the code the tests run on local files is the code that
reads c4 or NuminaMath on a machine with hub access. A source config:

    path: allenai/c4 | /data/math.jsonl     name: en (dataset config) | null
    split: validation                         field: text
    streaming: false                          min_chars: 0
    where: {source: [cn_k12, olympiads]}     (keep rows whose column value is listed)
"""

from __future__ import annotations

from pathlib import Path

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}


def _local_builder(path: str) -> str | None:
    suffix = "".join(Path(path).suffixes[-2:]) if path.endswith(".gz") else Path(path).suffix
    return _LOCAL_BUILDERS.get(suffix.removesuffix(".gz"))


def load_source(src) -> "datasets.Dataset | datasets.IterableDataset":
    import datasets

    path = str(src["path"])
    builder = _local_builder(path)
    if builder is not None:
        if not Path(path).exists():
            raise FileNotFoundError(f"calibration source file not found: {path}")
        return datasets.load_dataset(builder, data_files=path, split="train", streaming=src.get("streaming", False))
    if Path(path).is_dir():
        return datasets.load_dataset(path, name=src.get("name"), split=src.get("split", "train"))
    return datasets.load_dataset(
        path, name=src.get("name"), split=src.get("split", "train"), streaming=src.get("streaming", False)
    )


def _keep(row, field: str, min_chars: int, where: dict | None) -> bool:
    text = row.get(field)
    if not isinstance(text, str) or len(text) < min_chars:
        return False
    return all(row.get(col) in set(values) for col, values in (where or {}).items())


def iter_texts(src, seed: int):
    """Texts of a source in a seeded random order, filtered; lazy, so only what is needed is read."""
    ds = load_source(src)
    field = src.get("field", "text")
    if field not in (ds.column_names or [field]):
        raise ValueError(f"calibration source {src['path']!r} has no field {field!r}; columns: {ds.column_names}")
    if hasattr(ds, "to_iterable_dataset"):  # map-style: an exact seeded permutation
        ds = ds.shuffle(seed=seed)
    else:  # streamed: a seeded shuffle buffer
        ds = ds.shuffle(seed=seed, buffer_size=src.get("shuffle_buffer", 10_000))
    min_chars, where = int(src.get("min_chars", 0)), src.get("where")
    for row in ds:
        if _keep(row, field, min_chars, where):
            yield row[field]
