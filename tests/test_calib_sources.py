"""The paper's calibration sources and REAP's chat source on hub-shaped local files, and the disk cache.

The composed `calib=paper` / `calib=reap` configs are used as they are, with only `path` pointed at files
laid out like the hub datasets (c4: a repo directory with an `en` config and a validation split, read
streamed; NuminaMath-1.5: parquet with `source`/`solution`; the-stack-smol: `content`; evol-codealpaca:
`instruction`/`output`), so the filters, splits and formats are the ones a GPU run reads.
"""

import gzip
import json
import logging

import pytest
import torch
from omegaconf import OmegaConf

import ream_exp.calib.sources as sources
from ream_exp.calib import build_calibration, resolve_source
from ream_exp.calib.cache import cache_path, cached_calibration, calibration_key, tensor_checksum
from ream_exp.calib.sources import iter_texts, load_source
from ream_exp.moe.tiny import tiny_tokenizer
from ream_exp.settings import check_group
from tests.test_config import make_cfg

SEQ = 64  # c4 keeps texts of >= ceil(0.9 * 64) = 58 characters
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}")


def _c4_repo(root):
    """allenai/c4's layout: en/c4-<split>.NNNNN-of-NNNNN.json.gz, configs named in the README."""
    (root / "en").mkdir(parents=True)
    for shard in range(2):
        with gzip.open(root / "en" / f"c4-validation.{shard:05d}-of-00002.json.gz", "wt") as f:
            for i in range(12):
                text = f"C4 doc {shard}-{i}: the market opens at nine and the bridge is old. " + "w" * i
                f.write(json.dumps({"text": text, "timestamp": "2019-04-25", "url": f"http://x/{i}"}) + "\n")
            f.write(json.dumps({"text": "C4 SHORT doc of 57 characters, which is under the floor.",
                                "timestamp": "2019", "url": "u"}) + "\n")
        with gzip.open(root / "en" / f"c4-train.{shard:05d}-of-00002.json.gz", "wt") as f:
            f.write(json.dumps({"text": "TRAIN split text " * 10, "timestamp": "2019", "url": "u"}) + "\n")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: en\n  data_files:\n  - split: train\n    path: en/c4-train.*.json.gz\n"
        "  - split: validation\n    path: en/c4-validation.*.json.gz\n---\n")
    return root


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory):
    import pandas as pd

    root = tmp_path_factory.mktemp("hub")
    math = [{"problem": f"p{i}", "source": src, "answer": "1",
             "solution": f"[{src}] solution {i}: " + "x" * (length - len(f"[{src}] solution {i}: "))}
            for i, (src, length) in enumerate([("cn_k12", 500), ("olympiads", 470), ("amc_aime", 600),
                                               ("cn_k12", 460), ("synthetic_math", 800)] * 4)]
    pd.DataFrame(math).to_parquet(root / "numina.parquet")
    code = [{"content": f"# file {i}\n" + "y = 1\n" * 90, "lang": "Python"} for i in range(10)]
    code += [{"content": "z" * 460, "lang": "C"}, {"content": None, "lang": "C"}]
    (root / "stack.jsonl").write_text("".join(json.dumps(r) + "\n" for r in code))
    evol = [{"instruction": f"Write function {i} that adds numbers.", "output": f"def f{i}(a, b):\n    return a + b"}
            for i in range(30)]
    (root / "evol.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evol))
    return {"general": _c4_repo(root / "c4"), "math": root / "numina.parquet", "code": root / "stack.jsonl",
            "evol": root / "evol.jsonl"}


def paper_calib(hub_files, *extra):
    return make_cfg("model=local", "eval=none", "logger=none", "method=reap", "calib=paper",
                    *[f"calib.sources.{d}.path={hub_files[d]}" for d in ("general", "math", "code")],
                    "calib.n=10", f"calib.seq_len={SEQ}", *extra).calib


def reap_calib(hub_files, *extra):
    return make_cfg("model=local", "eval=none", "logger=none", "method=reap", "calib=reap",
                    f"calib.sources.code.path={hub_files['evol']}", "calib.n=6", "calib.seq_len=48", *extra).calib


def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


# ---- sources ---------------------------------------------------------------------------------------

def test_c4_source_is_streamed_validation_with_length_floor(hub_files):
    src = resolve_source(paper_calib(hub_files).sources.general, SEQ)
    assert src["min_chars"] == 58 and src["name"] == "en" and src["split"] == "validation"
    assert type(load_source(src)).__name__ == "IterableDataset"
    texts = list(iter_texts(src, seed=42))
    assert len(texts) == 24 and all(t.startswith("C4 doc") and len(t) >= 58 for t in texts)
    assert texts != sorted(texts) and texts == list(iter_texts(src, seed=42))


def test_numina_and_stack_filters(hub_files):
    cfg = paper_calib(hub_files)
    math = list(iter_texts(resolve_source(cfg.sources.math, SEQ), seed=42))
    assert len(math) == 8 and all(len(t) > 460 for t in math)
    assert {t.split("]")[0] for t in math} == {"[cn_k12", "[olympiads"}
    code = list(iter_texts(resolve_source(cfg.sources.code, SEQ), seed=42))
    assert len(code) == 10 and all(t.startswith("# file") for t in code)  # 460 chars and None dropped


def test_paper_mix_through_build_calibration(hub_files):
    tok = tiny_tokenizer()
    cfg = paper_calib(hub_files, "calib.mix=[0.2,0.3,0.5]")
    calib = build_calibration(cfg, tok)
    assert calib["input_ids"].shape == (10, SEQ)
    assert (calib["attention_mask"].sum(1) >= 0.9 * SEQ).all()
    texts = [tok.decode(r[m.bool()]) for r, m in zip(calib["input_ids"], calib["attention_mask"])]
    assert all(t.startswith("C4 doc") for t in texts[:2])
    assert all(t.startswith(("[cn_k12", "[olympiads")) for t in texts[2:5])
    assert all(t.startswith("# file") for t in texts[5:])
    assert torch.equal(build_calibration(cfg, tok)["input_ids"], calib["input_ids"])


def test_reap_chat_source_renders_template_and_packs(hub_files):
    tok = chat_tokenizer()
    cfg = reap_calib(hub_files)
    calib = build_calibration(cfg, tok)
    assert calib["input_ids"].shape == (6, 48) and calib["attention_mask"].all()
    text = tok.decode(calib["input_ids"].flatten())
    assert "<|user|>Write function" in text and "<|assistant|>def f" in text
    with pytest.raises(ValueError, match="no chat template"):
        build_calibration(cfg, tiny_tokenizer())


def test_source_config_errors_before_reading(hub_files):
    cfg = reap_calib(hub_files, "calib.mix=[0.5,0,0.5]")
    with pytest.raises(ValueError, match="calib.sources has no 'general'"):
        check_group("calib", cfg)
    cfg = reap_calib(hub_files)
    cfg.sources.code.fields = {"asker": "instruction"}
    with pytest.raises(ValueError, match=r"^calib.sources.code.fields has key 'asker', which is not a chat role: "
                                         r"calib.sources.code.fields maps roles \(system, user, assistant\)"):
        check_group("calib", cfg)
    cfg.sources.code.fields = None
    with pytest.raises(ValueError, match=r"^calib.sources.code.fields=null: format: chat needs `fields`"):
        check_group("calib", cfg)
    cfg = paper_calib(hub_files, "+calib.sources.math.format=markdown")
    with pytest.raises(ValueError, match=r"^calib.sources.math.format='markdown'; valid: text, chat$"):
        check_group("calib", cfg)


# ---- cache -----------------------------------------------------------------------------------------

def _reads(monkeypatch):
    calls = []
    real = sources.load_source
    monkeypatch.setattr(sources, "load_source", lambda src: calls.append(src["path"]) or real(src))
    return calls


def test_cache_hit_reads_no_source(hub_files, tmp_path, monkeypatch):
    tok, cfg = tiny_tokenizer(), paper_calib(hub_files)
    first = cached_calibration(cfg, tok, tmp_path)
    path = cache_path(tmp_path, calibration_key(cfg, tok))
    assert path.exists() and [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left
    monkeypatch.setattr(sources, "load_source", lambda *a, **k: pytest.fail("calibration source was read"))
    again = cached_calibration(cfg, tok, tmp_path)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_cache_key_covers_every_input(hub_files, tmp_path):
    """Every input of the tokens is in the key, except what made them (the calibration code's version and
    the tokenizer's digest): the entry records those, and a set made otherwise is rebuilt over."""
    tok, cfg = tiny_tokenizer(), paper_calib(hub_files)
    other_tok = tiny_tokenizer()
    other_tok.add_tokens(["<extra>"])
    assert calibration_key(cfg, other_tok) == calibration_key(cfg, chat_tokenizer()) == calibration_key(cfg, tok)
    renamed = tiny_tokenizer()
    renamed.name_or_path = "another/tokenizer"
    variants = {"base": (cfg, tok), "tokenizer name": (cfg, renamed)}
    for name, override in [("mix", "calib.mix=[0.3,0.3,0.4]"), ("n", "calib.n=11"), ("seq_len", "calib.seq_len=65"),
                           ("seed", "calib.seed=1"), ("min_fill", "calib.min_fill=0.8"), ("pack", "calib.pack=true"),
                           ("source filter", "calib.sources.math.min_chars=300"),
                           ("source path", f"calib.sources.code.path={hub_files['evol']}"),
                           ("source format", "+calib.sources.code.format=chat")]:
        variants[name] = (paper_calib(hub_files, override), tok)
    keys = {name: calibration_key(c, t) for name, (c, t) in variants.items()}
    assert len(set(keys.values())) == len(keys), keys
    # a source the mix does not read does not change the key
    unused = paper_calib(hub_files, "calib.mix=[0.5,0,0.5]")
    assert calibration_key(unused, tok) == calibration_key(
        paper_calib(hub_files, "calib.mix=[0.5,0,0.5]", "calib.sources.math.min_chars=1"), tok)


def test_cache_key_follows_local_file_contents(tmp_path, calib_files):
    cfg = OmegaConf.create(dict(mix=[1, 0, 0], n=2, seq_len=16, seed=0,
                                sources={"general": {"path": str(tmp_path / "g.jsonl")}}))
    (tmp_path / "g.jsonl").write_text(calib_files["general"].read_text())
    before = calibration_key(cfg, tiny_tokenizer())
    with open(tmp_path / "g.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more line of general text for the file"}) + "\n")
    assert calibration_key(cfg, tiny_tokenizer()) != before


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path):
    path.write_bytes(b"not a torch file")


def _resave(path, edit):
    blob = torch.load(path, weights_only=True)
    edit(blob)
    torch.save(blob, path)


def _wrong_shape(path):
    def edit(blob):
        for k in ("input_ids", "attention_mask"):
            blob[k] = blob[k][:-1]
        blob["checksum"] = tensor_checksum(blob)  # consistent, but not the rows this config asks for
    _resave(path, edit)


def _flipped_token(path):
    _resave(path, lambda blob: blob["input_ids"].__setitem__((0, 0), blob["input_ids"][0, 0] + 1))


def _wrong_key(path):
    _resave(path, lambda blob: blob.__setitem__("key", "0" * 24))


def _missing_mask(path):
    _resave(path, lambda blob: blob.pop("attention_mask"))


@pytest.mark.parametrize("damage", [_truncate, _garbage, _wrong_shape, _flipped_token, _wrong_key, _missing_mask])
def test_corrupt_cache_is_detected_and_rebuilt(damage, hub_files, tmp_path, monkeypatch, caplog):
    tok, cfg = tiny_tokenizer(), paper_calib(hub_files, "calib.mix=[0.5,0,0.5]")
    good = cached_calibration(cfg, tok, tmp_path)
    path = cache_path(tmp_path, calibration_key(cfg, tok))
    damage(path)
    reads = _reads(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="ream_exp"):
        rebuilt = cached_calibration(cfg, tok, tmp_path)
    assert "corrupt or partial" in caplog.text and reads, "a damaged file must be rebuilt from the sources"
    assert all(torch.equal(good[k], rebuilt[k]) for k in good)
    monkeypatch.setattr(sources, "load_source", lambda *a, **k: pytest.fail("rebuilt file not reused"))
    assert torch.equal(cached_calibration(cfg, tok, tmp_path)["input_ids"], good["input_ids"])


def _other_tokenizer():
    tok = tiny_tokenizer()
    tok.add_tokens(["<extra>"])
    return tok


@pytest.mark.parametrize("change", ["FORMAT_VERSION", "tokenizer"])
def test_a_set_made_otherwise_is_rebuilt_and_says_why(change, hub_files, tmp_path, monkeypatch, caplog):
    """A set made by another calibration code version or another tokenizer (same name, other digest) is
    rebuilt and overwritten, with one log line naming what differed; an unchanged one is reused."""
    import ream_exp.calib.cache as cache

    tok, cfg = tiny_tokenizer(), paper_calib(hub_files, "calib.mix=[0.5,0,0.5]")
    cached_calibration(cfg, tok, tmp_path)
    path = cache_path(tmp_path, calibration_key(cfg, tok))
    recorded = torch.load(path, weights_only=True)["made_by"]
    assert recorded["calibration code"] == cache.FORMAT_VERSION
    assert recorded["tokenizer"] == cache.tokenizer_fingerprint(tok)["hash"]
    reads = _reads(monkeypatch)
    caplog.set_level(logging.INFO, logger="ream_exp")
    cached_calibration(cfg, tok, tmp_path)
    assert reads == [] and "calibration cache" not in caplog.text, "an unchanged set is reused"

    if change == "FORMAT_VERSION":
        monkeypatch.setattr(cache, "FORMAT_VERSION", cache.FORMAT_VERSION + 1)
        why = "calibration code v1, this is v2"
    else:
        tok = _other_tokenizer()
        old, new = recorded["tokenizer"], cache.tokenizer_fingerprint(tok)["hash"]
        why = f"tokenizer {old[:12]}..., this is {new[:12]}..."
    assert cache_path(tmp_path, calibration_key(cfg, tok)) == path  # the same entry, found and rebuilt over
    rebuilt = cached_calibration(cfg, tok, tmp_path)
    assert reads, "the set was not rebuilt from its sources"
    stale = [r.getMessage() for r in caplog.records if r.getMessage().startswith("calibration cache")]
    assert stale == [f"calibration cache {path} was made by {why}: recomputing"]
    assert "corrupt" not in caplog.text
    assert torch.load(path, weights_only=True)["made_by"] == cache.calibration_made_by(
        cache.calibration_key_material(cfg, tok))
    reads.clear()
    assert torch.equal(cached_calibration(cfg, tok, tmp_path)["input_ids"], rebuilt["input_ids"]) and reads == []


def test_a_set_without_a_record_is_rebuilt(hub_files, tmp_path, monkeypatch, caplog):
    """A set from before entries recorded what made them is of an unknown version: rebuilt, one log line."""
    tok, cfg = tiny_tokenizer(), paper_calib(hub_files, "calib.mix=[0.5,0,0.5]")
    cached_calibration(cfg, tok, tmp_path)
    path = cache_path(tmp_path, calibration_key(cfg, tok))
    _resave(path, lambda blob: blob.pop("made_by"))
    reads = _reads(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="ream_exp"):
        cached_calibration(cfg, tok, tmp_path)
    assert reads and caplog.messages == [
        f"calibration cache {path} was made by an unknown version (no record of what made it), "
        "this is calibration code v1: recomputing"]


def test_interrupted_write_leaves_no_file(hub_files, tmp_path, monkeypatch):
    tok, cfg = tiny_tokenizer(), paper_calib(hub_files, "calib.mix=[1,0,0]")

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        cached_calibration(cfg, tok, tmp_path)
    assert not any((tmp_path / "calib").iterdir())


def test_pretokenized_bypasses_cache(tmp_path):
    data = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    torch.save(data, tmp_path / "tokens.pt")
    cfg = OmegaConf.create({"name": "pretokenized", "path": str(tmp_path / "tokens.pt"), "mix": None})
    out = cached_calibration(cfg, None, tmp_path / "cache")
    assert torch.equal(out["input_ids"], data["input_ids"]) and not (tmp_path / "cache").exists()


def test_run_uses_the_cache(tiny_checkpoint, calib_files, tmp_path, monkeypatch):
    from ream_exp.run import run

    def cfg(out):
        return make_cfg("model=local", f"model.path={tiny_checkpoint}", "calib=local", "calib.n=8",
                        "calib.seq_len=16", *[f"calib.sources.{d}.path={p}" for d, p in calib_files.items()],
                        "eval=none", "logger=none", "method=freq", "save=false", "progress=false",
                        f"cache_dir={tmp_path / 'cache'}")
    first = run(cfg("a"), tmp_path / "a")
    assert len(list((tmp_path / "cache" / "calib").glob("*.pt"))) == 1
    monkeypatch.setattr(sources, "load_source", lambda *a, **k: pytest.fail("calibration source was read"))
    assert run(cfg("b"), tmp_path / "b")["calib_tokens"] == first["calib_tokens"]
