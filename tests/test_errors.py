"""Every bad input fails with one ConfigError naming the setting, before any weights load.

Through `run()` with the model loader replaced by a failure (so "before the weights load" is what is
tested), and through the real `ream-exp` console script: one `error: ...` line on stderr, exit code 1,
the traceback in the run directory's error.txt, and the full trace again with HYDRA_FULL_ERROR=1.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ream_exp.run as run_module
from ream_exp.config import ConfigError
from ream_exp.dataset_check import check_datasets, is_cached
from ream_exp.run import run, validate
from ream_exp.weight_files import check_safetensors
from tests.test_config import _local, make_cfg

REAM_EXP = str(Path(sys.executable).parent / "ream-exp")


@pytest.fixture
def no_model_load(monkeypatch):
    """The weights must never be loaded: any attempt fails the test."""
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("model loaded despite bad input"))


def _run_refused(cfg, run_dir, message):
    with pytest.raises(ConfigError, match=message) as caught:
        run(cfg, run_dir)
    assert "\n" not in str(caught.value)
    return str(caught.value)


BAD_SETTINGS = [
    (["ratio=abc"], r"^ratio='abc' is not a number: ratio is the fraction of experts removed .*\[0, 1\)"),
    (["ratio=null"], r"^ratio=null is not a number"),
    (["ratio=[0.25,0.5]"], r"^ratio=\[0.25, 0.5\] is not a number.*ream-exp -m ratio=0.25,0.5"),
    (["ratio=true"], r"^ratio=true is not a number"),
    (["calib.mix=abc"], r"^calib.mix='abc' is not a mapping or a list: calib.mix is a mapping \{source: weight\}"
                        r".* or 3 ratios \(general : math : code\)"),
    (["calib.mix=[0.5,x,0.5]"], r"^calib.mix\[1\]='x' is not a number"),
    (["calib.mix={general:0.5,tol:0.5}"], r"^calib.mix names source 'tol', which calib.sources does not declare: "
                                          r"calib.sources declares general, math, code"),
    (["calib.mix={}"], r"^calib.mix=\{\} names no source: calib.mix is a mapping \{source: weight\}"),
    (["calib.mix={general:0.5,code:-0.1}"], r"^calib.mix.code=-0.1 must be >= 0: calib.mix.code is the weight of its "
                                            r"source, a fraction of calib.n"),
    (["calib.mix={general:x}"], r"^calib.mix.general='x' is not a number: calib.mix.general is the weight of its "
                                r"source"),
    (["calib.mix={general:[1]}"], r"^calib.mix.general=\[1\] is not a number"),
    (["calib.mix={general:0,code:0}"], r"^calib.mix is all zero \(\{'general': 0.0, 'code': 0.0\}\)"),
    (["calib.n=2", "calib.mix={general:0.3,code:0.3}"], r"^calib.n=2 with calib.mix=.* takes int\(n \* ratio\) = 0"),
    (["seed=abc"], r"^seed='abc' is not an integer"),
    (["seed=1.5"], r"^seed=1.5 is not an integer"),
    (["calib.n=0"], r"^calib.n=0 must be a positive integer: calib.n is the number of calibration sequences"),
    (["calib.n=-5"], r"^calib.n=-5 must be a positive integer"),
    (["calib.n=abc"], r"^calib.n='abc' is not an integer"),
    (["calib.seq_len=0"], r"^calib.seq_len=0 must be a positive integer"),
    (["calib.batch_size=0"], r"^calib.batch_size=0 must be a positive integer"),
    (["calib.min_fill=2"], r"^calib.min_fill=2.0 is outside \[0, 1\]"),
    (["calib.n=2", "calib.mix=[0.3,0.3,0.3]"], r"^calib.n=2 with calib.mix=.* takes int\(n \* ratio\) = 0 sequences"),
    (["method=hc_smoe", "+method.sequental=true"],
     r"^unknown setting method.sequental \(method=hc_smoe\); allowed: align, align_cache_mb, align_tokens, group_size, "
     r"grouping, merge, merge_density, merge_max_iter, merge_rank, merge_tol, name, pca_dim, pca_seed, protect, "
     r"sequential, sim_tokens \(did you mean sequential\?\)$"),
    (["method=m_smoe", "+method.sequental=true"],
     r"^unknown setting method.sequental \(method=m_smoe\); allowed: align, align_tokens, group_size, grouping, "
     r"merge, merge_density, merge_max_iter, merge_rank, merge_tol, name, pca_dim, pca_seed, protect, saliency, "
     r"sequential \(did you mean sequential\?\)$"),
    (["method=hc_smoe", "method.align=sideways"], r"^method.align='sideways'; valid: both, activations"),
    (["method=m_smoe", "method.sequential=yes"], r"^method.sequential='yes' must be true or false"),
    (["method=hc_smoe", "method.align_tokens=many"], r"^method.align_tokens='many' is not an integer"),
    (["method=ream", "+method.groupsize=4"],
     r"^unknown setting method.groupsize \(method=ream\); allowed: .*group_size"),
    (["method=reap", "+method.group_size=4"],
     r"^unknown setting method.group_size \(method=reap\); allowed: name, protect, saliency_form, sequential$"),
    (["method=freq_official", "method.saliency_form=renormalised"],
     r"^method.saliency_form='renormalised'; valid: paper, official$"),
    (["method=ean", "+method.sequential=true"], r"^unknown setting method.sequential \(method=ean\); allowed: name, protect$"),
    (["method=random", "+method.sed=3"],
     r"^unknown setting method.sed \(method=random\); allowed: name, seed \(did you mean seed\?\)$"),
    (["logger=wandb", "logger.mode=loud"], r"^logger.mode='loud'; valid: null, offline, online, disabled$"),
    (["logger=wandb", "logger.name=tensorboard"], r"^logger.name='tensorboard'; valid: wandb, none$"),
]


@pytest.mark.parametrize("overrides,message", BAD_SETTINGS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_setting_is_one_line_naming_it(overrides, message, tiny_checkpoint, calib_files, tmp_path, no_model_load):
    cfg = _local(tiny_checkpoint, calib_files, f"cache_dir={tmp_path / 'cache'}", *overrides)
    _run_refused(cfg, tmp_path / "run", message)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_good_settings_of_merging_baselines_pass(tiny_checkpoint, calib_files, tmp_path):
    for method in ("hc_smoe", "m_smoe", "ream"):
        validate(_local(tiny_checkpoint, calib_files, f"cache_dir={tmp_path}", f"method={method}", "ratio=0.5",
                        "method.sequential=true"))


def _edited_checkpoint(tiny_checkpoint, tmp_path, **config_changes) -> Path:
    path = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, path)
    config = json.loads((path / "config.json").read_text())
    config.update(config_changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_top_k_beyond_the_experts_blames_the_model_config(tiny_checkpoint, calib_files, tmp_path, no_model_load):
    model = _edited_checkpoint(tiny_checkpoint, tmp_path, num_experts_per_tok=9)
    message = _run_refused(_local(model, calib_files, f"cache_dir={tmp_path / 'c'}", "ratio=0"), tmp_path / "run",
                           r"num_experts_per_tok \(top_k\)=9 with num_experts=8; top_k must be between 1 and")
    assert "ratio" not in message


def test_unreadable_model_config_names_model_path(tmp_path, no_model_load):
    (tmp_path / "model").mkdir()
    cfg = make_cfg("model=local", f"model.path={tmp_path / 'model'}", "eval=none", "logger=none",
                   f"cache_dir={tmp_path / 'c'}")
    _run_refused(cfg, tmp_path / "run", r"^model.path='.*model': its config.json cannot be read")


def test_unwritable_cache_dir_fails_before_loading(tiny_checkpoint, calib_files, tmp_path, no_model_load):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cfg = _local(tiny_checkpoint, calib_files, f"cache_dir={blocker / 'cache'}")
    _run_refused(cfg, tmp_path / "run", r"^cache_dir='.*a_file/cache' cannot be written .*writable directory")
    if os.geteuid() != 0:  # root may write anywhere; a read-only directory stops everyone else
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cfg = _local(tiny_checkpoint, calib_files, f"cache_dir={locked}")
        _run_refused(cfg, tmp_path / "run2", r"^cache_dir='.*locked' cannot be written")


# ---- pre-tokenised ids against the model's vocabulary ----------------------------------------------

def _pretokenized_cfg(tiny_checkpoint, tmp_path, ids):
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "calib.pt")
    return make_cfg("model=local", f"model.path={tiny_checkpoint}", "method=reap", "eval=none", "logger=none",
                    "calib=pretokenized", f"calib.path={tmp_path / 'calib.pt'}", f"cache_dir={tmp_path / 'c'}")


def test_pretokenized_ids_beyond_the_vocabulary(tiny_checkpoint, tmp_path, no_model_load):
    vocab = json.loads((Path(tiny_checkpoint) / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (3, 10), generator=torch.Generator().manual_seed(0))
    validate(_pretokenized_cfg(tiny_checkpoint, tmp_path, ids))  # every id a row of the embedding: fine
    ids[1, 4] = vocab + 6
    ids[2, 2] = vocab  # the first id past the end
    _run_refused(_pretokenized_cfg(tiny_checkpoint, tmp_path, ids), tmp_path / "run",
                 rf"input_ids go up to {vocab + 6}, beyond the model's vocabulary \(vocab_size={vocab}: "
                 rf"ids 0..{vocab - 1}\)")
    ids = torch.full((3, 10), vocab - 1)
    ids[0, 0] = -3
    _run_refused(_pretokenized_cfg(tiny_checkpoint, tmp_path, ids), tmp_path / "run",
                 r"input_ids must be >= 0, but the smallest is -3")


# ---- weight files ---------------------------------------------------------------------------------

def _header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def _with_header(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _data(path: Path) -> bytes:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 + n:]


def _truncated(path):
    path.write_bytes(path.read_bytes()[:-100])


def _foreign(path):
    torch.save({"w": torch.zeros(3)}, path)  # a torch zip pickle under the safetensors name


def _garbage_header(path):
    path.write_bytes(struct.pack("<Q", 12) + b"not json!!!!" + b"\0" * 64)


def _shape_off(path):
    header, data = _header(path), _data(path)
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [2 * header[name]["shape"][0]] + header[name]["shape"][1:]
    _with_header(path, header, data)


def _offsets_past_end(path):
    header, data = _header(path), _data(path)
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 8, end + 8]
    _with_header(path, header, data)


def _trailing_bytes(path):
    path.write_bytes(path.read_bytes() + b"\0" * 16)  # bytes no tensor covers: the library refuses them too


DAMAGE = [(_truncated, r"is truncated: tensor .* lies at bytes"),
          (_foreign, r"is truncated or not a safetensors file \(\d+ bytes\): header too large"),
          (_garbage_header, r"is truncated or not a safetensors file \(\d+ bytes\): invalid JSON in header"),
          (_shape_off, r"needs \d+ bytes, but its data_offsets span \d+"),
          (_offsets_past_end, r"is truncated: tensor .* lies at bytes"),
          (_trailing_bytes, r"is not a valid safetensors file: .*not fully covered")]


@pytest.mark.parametrize("damage,message", DAMAGE, ids=lambda v: getattr(v, "__name__", ""))
def test_damaged_weight_file_is_named_before_loading(damage, message, tiny_checkpoint, calib_files, tmp_path,
                                                     no_model_load):
    from safetensors import safe_open

    model = _edited_checkpoint(tiny_checkpoint, tmp_path)
    weights = model / "model.safetensors"
    check_safetensors(weights)
    with safe_open(weights, "pt") as f:  # the reference: the library opens the intact file
        f.keys()
    damage(weights)
    with pytest.raises(Exception):  # ... and refuses the damaged one, as the check does
        with safe_open(weights, "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    refused = _run_refused(_local(model, calib_files, f"cache_dir={tmp_path / 'c'}"), tmp_path / "run", message)
    assert refused.startswith(f"weight file {weights}")


def test_sharded_index_must_name_existing_files(tiny_checkpoint, calib_files, tmp_path, no_model_load):
    model = _edited_checkpoint(tiny_checkpoint, tmp_path)
    shard = "model-00001-of-00002.safetensors"
    (model / "model.safetensors").rename(model / shard)
    names = list(_header(model / shard))
    weight_map = {n: shard for n in names if n != "__metadata__"}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _run_refused(_local(model, calib_files, f"cache_dir={tmp_path / 'c'}"), tmp_path / "run",
                 r"model.safetensors.index.json names weight file\(s\) that do not exist: model-00002-of-00002")
    _truncated(model / shard)
    (model / "model-00002-of-00002.safetensors").write_bytes((model / shard).read_bytes())
    _run_refused(_local(model, calib_files, f"cache_dir={tmp_path / 'c'}"), tmp_path / "run",
                 rf"weight file {model / 'model-00001-of-00002.safetensors'} is truncated")


# ---- hub datasets: cached or reachable, checked before the weights load ----------------------------

def test_offline_paper_calibration_names_every_missing_dataset(tiny_checkpoint, tmp_path, monkeypatch,
                                                               no_model_load):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cfg = make_cfg("model=local", f"model.path={tiny_checkpoint}", "calib=paper", "eval=none", "logger=none",
                   f"cache_dir={tmp_path / 'c'}")
    message = _run_refused(cfg, tmp_path / "run", r"^dataset\(s\) offline .* not in the datasets cache")
    for expected in ("allenai/c4 (en) for calib.sources.general", "AI-MO/NuminaMath-1.5 for calib.sources.math",
                     "bigcode/the-stack-smol for calib.sources.code"):
        assert expected in message


def test_offline_eval_names_the_task_datasets(tiny_checkpoint, tmp_path, monkeypatch, no_model_load):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cfg = make_cfg("model=local", f"model.path={tiny_checkpoint}", "method=none", "eval=paper", "logger=none",
                   f"cache_dir={tmp_path / 'c'}")
    message = _run_refused(cfg, tmp_path / "run", r"^dataset\(s\) offline")
    assert "cais/mmlu (abstract_algebra, anatomy, astronomy +54 more) for eval task mmlu" in message
    assert "allenai/ai2_arc (ARC-Challenge, ARC-Easy) for eval task arc_challenge, arc_easy" in message
    assert "openai/gsm8k (main) for eval task gsm8k" in message
    assert "openai_humaneval" not in message  # skipped without allow_code_eval, so not needed


def _fake_cached_dataset(cache: Path, repo_id: str, config: str, rows: list[dict]) -> None:
    """A prepared dataset in the datasets cache under a hub id, as `datasets` leaves one after a download."""
    import datasets

    cache.mkdir(parents=True, exist_ok=True)
    source = cache / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.load_dataset("json", data_files=str(source), split="train", cache_dir=str(cache / "build"))
    (built,) = (cache / "build" / "json").iterdir()
    namespace, name = repo_id.split("/")
    target = cache / f"{namespace}___{name}" / config
    target.parent.mkdir(parents=True)
    shutil.move(str(built), target)
    for info in target.glob("*/*/dataset_info.json"):
        info.write_text(json.dumps({**json.loads(info.read_text()), "config_name": config}))
    for arrow in target.glob("*/*/json-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("json-", f"{name}-", 1)))


def test_a_cached_dataset_counts_as_present_exactly_when_datasets_loads_it(tmp_path, monkeypatch):
    import datasets

    cache = tmp_path / "datasets_cache"
    _fake_cached_dataset(cache, "someorg/some_text", "en", [{"text": f"row {i}"} for i in range(5)])
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    for config, present in (("en", True), (None, True), ("fr", False)):
        assert is_cached("someorg/some_text", config) is present
        try:  # the reference: what datasets itself can load offline from that cache
            loaded = datasets.load_dataset("someorg/some_text", name=config, split="train", cache_dir=str(cache))
            assert [r["text"] for r in loaded] == [f"row {i}" for i in range(5)]
            assert present
        except (ValueError, ConnectionError, FileNotFoundError):
            assert not present
    check_datasets([("calib.sources.general", ("someorg/some_text", "en", None))])
    with pytest.raises(ConfigError, match=r"someorg/some_text \(fr\) for calib.sources.math$|"
                                          r"someorg/some_text \(fr\) for calib.sources.math;"):
        check_datasets([("calib.sources.general", ("someorg/some_text", "en", None)),
                        ("calib.sources.math", ("someorg/some_text", "fr", None))])


def test_online_unreachable_hub_is_named_with_the_reason(tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    with pytest.raises(ConfigError, match=r"^dataset\(s\) neither reachable nor in the datasets cache: "
                                          r"someorg/absent for eval task x \[\w+"):
        check_datasets([("eval task x", ("someorg/absent", None, None))])


# ---- the console script --------------------------------------------------------------------------

def _cli(tmp_path, *overrides, extra_env=None):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **(extra_env or {}))
    flags = [o for o in overrides if o.startswith("-")]  # argparse wants -m before the overrides
    cmd = [REAM_EXP, *flags, "logger=none", "eval=none", "progress=false", f"cache_dir={tmp_path / 'cache'}",
           *[o for o in overrides if o not in flags]]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_cli_prints_one_error_line_and_keeps_the_trace_in_error_txt(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    done = _cli(tmp_path, "model=local", f"model.path={tiny_checkpoint}", "ratio=abc", f"hydra.run.dir={out}")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "error: ratio='abc' is not a number: ratio is the fraction of experts removed per MoE layer, in [0, 1)"]
    assert "Traceback" not in done.stdout
    trace = (out / "error.txt").read_text()
    assert trace.startswith("Traceback") and "ConfigError: ratio='abc'" in trace
    # HYDRA_FULL_ERROR=1: the trace on stderr too
    full = _cli(tmp_path, "model=local", f"model.path={tiny_checkpoint}", "ratio=abc", f"hydra.run.dir={out}",
                extra_env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr and "ConfigError: ratio='abc'" in full.stderr


def test_cli_unknown_group_option_is_one_line(tmp_path):
    done = _cli(tmp_path, "method=magic", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: In 'config': Could not find 'method/magic'; available: aimer, ean, freq, freq_official, hc_smoe")
    assert "ream_official" in line
    done = _cli(tmp_path, "ratio=[0.25,", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: cannot parse override 'ratio=[0.25,': ")


def test_cli_unexpected_errors_keep_their_traceback(tiny_checkpoint, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    (model / "tokenizer.json").write_text("{ broken")  # a bug-like failure, not one of our checks
    (model / "tokenizer_config.json").unlink(missing_ok=True)
    done = _cli(tmp_path, "model=local", f"model.path={model}", "method=none", "save=false",
                f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 1 and "Traceback" in done.stderr
    assert not any(line.startswith("error: ") for line in done.stderr.splitlines())


def test_cli_multirun_logs_a_failed_run_and_goes_on(tiny_checkpoint, tmp_path):
    sweep = tmp_path / "sweep"
    done = _cli(tmp_path, "-m", "model=local", f"model.path={tiny_checkpoint}", "method=none", "save=false",
                "ratio=abc,0.25", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}")
    assert "Traceback" not in done.stderr + done.stdout
    assert "ConfigError: ratio='abc'" in (sweep / "0" / "error.txt").read_text()
    assert json.loads((sweep / "1" / "metrics.json").read_text())["status"] == "done"
    logged = [line for line in (done.stdout + done.stderr).splitlines() if "run failed (ConfigError)" in line]
    assert len(logged) == 1 and "ratio='abc' is not a number" in logged[0]


def test_hub_calibration_sources_are_not_needed_once_tokenised(tiny_checkpoint, calib_files, tmp_path, monkeypatch):
    import datasets
    from transformers import AutoTokenizer

    import ream_exp.calib.cache as calib_cache
    from ream_exp.calib.cache import cache_path, calibration_key_material, key_of, save_cached

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cfg = _local(tiny_checkpoint, calib_files, f"cache_dir={tmp_path / 'c'}", "calib.n=4", "calib.seq_len=8",
                 "calib.sources.math.path=someorg/numbers")
    with pytest.raises(ConfigError, match=r"someorg/numbers for calib.sources.math"):
        validate(cfg)
    material = calibration_key_material(cfg.calib, AutoTokenizer.from_pretrained(str(tiny_checkpoint)))
    rows = sum(material["counts"].values())
    tokens = torch.ones(rows, 8, dtype=torch.long)
    save_cached(cache_path(cfg.cache_dir, key_of(material)), key_of(material), material,
                {"input_ids": tokens, "attention_mask": tokens})
    validate(cfg)  # the tokenised set is cached: the hub source is never read, so it need not be reachable
    # a set the cache would not use (made by other calibration code, or damaged) is rebuilt from the sources
    with pytest.MonkeyPatch.context() as newer:
        newer.setattr(calib_cache, "FORMAT_VERSION", calib_cache.FORMAT_VERSION + 1)
        with pytest.raises(ConfigError, match=r"someorg/numbers for calib.sources.math"):
            validate(cfg)
    validate(cfg)
    entry = cache_path(cfg.cache_dir, key_of(material))
    entry.write_bytes(entry.read_bytes()[:-100])  # cut short
    with pytest.raises(ConfigError, match=r"someorg/numbers for calib.sources.math"):
        validate(cfg)


def test_hub_model_weights_in_the_hub_cache_are_checked_too(tiny_checkpoint, calib_files, tmp_path, monkeypatch,
                                                           no_model_load):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someorg--tiny-moe" / "snapshots" / "c0ffee"
    shutil.copytree(tiny_checkpoint, snapshot)
    (cache / "models--someorg--tiny-moe" / "refs").mkdir()
    (cache / "models--someorg--tiny-moe" / "refs" / "main").write_text("c0ffee")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cfg = _local(tiny_checkpoint, calib_files, f"cache_dir={tmp_path / 'c'}", "model=qwen3_30b_a3b",
                 "model.path=someorg/tiny-moe", "model.group_size=null")
    validate(cfg)  # the hub id resolves from the cache, its weights intact
    _truncated(snapshot / "model.safetensors")
    _run_refused(cfg, tmp_path / "run", rf"^weight file {snapshot / 'model.safetensors'} is truncated")


def test_old_entry_point_names_the_new_one():
    """`python -m ream_exp.run` (the entry point before ream_exp.cli) says which command to run instead."""
    done = subprocess.run([sys.executable, "-m", "ream_exp.run"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "python -m ream_exp.cli" in done.stderr
