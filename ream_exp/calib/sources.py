"""Read raw calibration texts from a source: a local text/JSONL/JSON/parquet file or a hub dataset.

Both go through `datasets.load_dataset`, so the code the tests run on local files is the code that
reads c4 or NuminaMath on a machine with hub access. A source config:

    path: allenai/c4 | /data/math.jsonl     name: en (dataset config) | null
    split: validation                         field: text
    streaming: false                          min_chars: 0
    where: {source: [cn_k12, olympiads]}     (keep rows whose column value is listed)
    revision: null                            (a hub dataset's git revision, to pin it)
    format: text | chat                       (chat: render `fields` with the tokenizer's chat template)
    fields: {user: instruction, assistant: output}   (format: chat; role -> column, in turn order)

A local directory is read like a hub repository (its README's `configs:` name the configs and splits),
so a test can lay out files the way allenai/c4 does and read them with name/split/streaming.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, shown

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}


def _local_builder(path: str) -> str | None:
    suffix = "".join(Path(path).suffixes[-2:]) if path.endswith(".gz") else Path(path).suffix
    return _LOCAL_BUILDERS.get(suffix.removesuffix(".gz"))


def check_local_source(src) -> None:
    """A source read from a local file must exist (checked before the model loads)."""
    path = str(src["path"])
    if _local_builder(path) is not None and not Path(path).expanduser().exists():
        raise ConfigError(f"calibration source file not found: {path} (calib.sources.*.path: a local "
                          f"{'/'.join(_LOCAL_BUILDERS)} file, a directory or a hub dataset id)")


def hub_dataset(src) -> tuple[str, str | None, str | None] | None:
    """(hub id, config name, revision) when the source is read from the hub; None for local files."""
    path = str(src["path"])
    if _local_builder(path) is not None or Path(path).expanduser().exists():
        return None
    return path, src.get("name"), src.get("revision")


def load_source(src) -> "datasets.Dataset | datasets.IterableDataset":
    import datasets

    path = str(src["path"])
    builder = _local_builder(path)
    if builder is not None:
        check_local_source(src)
        return datasets.load_dataset(builder, data_files=path, split="train", streaming=src.get("streaming", False))
    if Path(path).is_dir():
        return datasets.load_dataset(path, name=src.get("name"), split=src.get("split", "train"),
                                     streaming=src.get("streaming", False))
    return datasets.load_dataset(
        path, name=src.get("name"), split=src.get("split", "train"), streaming=src.get("streaming", False),
        revision=src.get("revision"),
    )


FORMATS = ("text", "chat")
CHAT_ROLES = ("system", "user", "assistant")


def check_chat_fields(src, setting: str) -> None:
    """A source with format: chat names the columns of its turns (`fields`; their roles are checked by the
    settings schema, ream_exp.setting_schema)."""
    if src.get("format", "text") == "chat" and not src.get("fields"):
        raise ConfigError(f"{setting}.fields={shown(src.get('fields'))}: format: chat needs `fields` mapping roles "
                          f"({', '.join(CHAT_ROLES)}) to columns, e.g. {{user: instruction, assistant: output}}")


def source_columns(src) -> list[str]:
    """The dataset columns a source reads: its `field`, or the columns of its chat `fields`."""
    if src.get("format", "text") == "chat":
        return list(dict(src["fields"]).values())
    return [src.get("field", "text")]


def _chat_renderer(src, tokenizer):
    """row -> the conversation as the tokenizer's chat template writes it (text, special tokens included)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"calibration source {src['path']!r} has format: chat, but the tokenizer has no chat "
                          "template; use a chat/instruct model's tokenizer or format: text")
    fields = dict(src["fields"])

    def render(row):
        if not all(isinstance(row.get(col), str) for col in fields.values()):
            return None
        messages = [{"role": role, "content": row[col]} for role, col in fields.items()]
        return tokenizer.apply_chat_template(messages, tokenize=False)

    return render


def _where(row, where: dict | None) -> bool:
    return all(row.get(col) in set(values) for col, values in (where or {}).items())


def iter_texts(src, seed: int, tokenizer=None):
    """Texts of a source in a seeded random order, filtered; lazy, so only what is needed is read.

    format: text yields the `field` column as is; format: chat yields each row's `fields` rendered as a
    conversation by `tokenizer`'s chat template. `where` filters rows, `min_chars` the resulting texts.
    """
    columns = source_columns(src)
    render = _chat_renderer(src, tokenizer) if src.get("format", "text") == "chat" else None
    ds = load_source(src)
    missing = [c for c in columns if c not in (ds.column_names or columns)]
    if missing:
        raise ConfigError(f"calibration source {src['path']!r} has no field {missing[0]!r}; columns: {ds.column_names}")
    if hasattr(ds, "to_iterable_dataset"):  # map-style: an exact seeded permutation
        ds = ds.shuffle(seed=seed)
    else:  # streamed: a seeded shuffle buffer
        ds = ds.shuffle(seed=seed, buffer_size=src.get("shuffle_buffer", 10_000))
    min_chars, where = int(src.get("min_chars") or 0), src.get("where")
    for row in ds:
        if not _where(row, where):
            continue
        text = render(row) if render else row.get(columns[0])
        if isinstance(text, str) and len(text) >= min_chars:
            yield text
