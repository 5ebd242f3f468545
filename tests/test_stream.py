"""model.stream=true: the streamed checkpoint equals the in-memory run's, one decoder layer in memory at a
time, and a run killed mid-way resumes to the same checkpoint."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from ream_exp.config import ConfigError
from ream_exp.methods.layer_stream import LayerStream
from ream_exp.moe import decoder_layers
from ream_exp.moe.registry import auto_model_class
from ream_exp.moe.tiny import TINY_FAMILIES, tiny_batch, tiny_model, tiny_tokenizer
from ream_exp.partial_checkpoint import PARTIAL, PLANS, PROGRESS
from ream_exp.run import run, validate
from ream_exp.weight_files import INDEX
from tests.mtp_helpers import read_all
from tests.test_config import make_cfg


def _source(root: Path, family: str, dtype=torch.float32, **extra) -> Path:
    """A saved tiny model with 4 decoder layers (Qwen-style families: layer 1 is dense)."""
    path = root / "-".join(["src", family, str(dtype).split(".")[1], *(f"{k}_{v}" for k, v in sorted(extra.items()))])
    if not path.exists():
        tiny_model(family, num_experts=8, top_k=2, layers=4, **extra).to(dtype).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    return path


def _overrides(source, calib_files, cache, method, *extra) -> list[str]:
    return ["model=local", f"model.path={source}", "calib=local", "calib.n=16", "calib.seq_len=32",
            *[f"calib.sources.{d}.path={p}" for d, p in calib_files.items()], "eval=none", "logger=none",
            f"cache_dir={cache}", "progress=false", f"method={method}", "ratio=0.5", "baseline=false", *extra]


def _cfg(source, calib_files, cache, method, *extra):
    return make_cfg(*_overrides(source, calib_files, cache, method, *extra))


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Same tensors (names, dtypes, bytes), same config.json and plan, and both load in stock transformers."""
    ta, tb = read_all(a), read_all(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    plans = [json.loads((d / "plan.json").read_text()) for d in (a, b)]
    assert plans[0]["layers"] == plans[1]["layers"]
    ids, mask = tiny_batch()
    logits = []
    for d in (a, b):
        model = auto_model_class(AutoConfig.from_pretrained(d)).from_pretrained(d).eval()  # towers too
        with torch.no_grad():
            logits.append(model(input_ids=ids, attention_mask=mask).logits)
    assert torch.equal(*logits)
    assert {t.dtype for t in ta.values()} == {p.dtype for p in model.parameters()} | {
        b.dtype for n, b in model.named_buffers() if n in model.state_dict()}


def _streamed_index_is_complete(checkpoint: Path) -> None:
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    on_disk = {}
    for f in checkpoint.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            on_disk.update({k: f.name for k in h.keys()})
    assert index["weight_map"] == on_disk
    assert not (checkpoint / PROGRESS).exists() and not (checkpoint / PLANS).exists()


@pytest.mark.parametrize("method", ["ream_official", "ream_nonseq", "hc_smoe", "m_smoe", "hc_smoe_karcher", "freq",
                                    "ean", "reap", "random", "none", "aimer", "router_norm", "man"])
def test_streamed_checkpoint_equals_in_memory(method, calib_files, tmp_path):
    source = _source(tmp_path, "qwen3_moe")
    memory = run(_cfg(source, calib_files, tmp_path / "cache", method), tmp_path / "memory")
    streamed = run(_cfg(source, calib_files, tmp_path / "cache", method, "model.stream=true"), tmp_path / "streamed")
    assert_same_checkpoint(tmp_path / "memory" / "checkpoint", tmp_path / "streamed" / "checkpoint")
    _streamed_index_is_complete(tmp_path / "streamed" / "checkpoint")
    assert not (tmp_path / "streamed" / PARTIAL).exists()
    for key in ("experts_before", "experts_after", "params_before", "params_after", "weights", "weights_before"):
        assert memory[key] == streamed[key], key


# every tiny family (qwen3_moe in float32: test_streamed_checkpoint_equals_in_memory, with every method)
OTHER_FAMILIES = [(f, torch.float32, {}) for f in TINY_FAMILIES if f != "qwen3_moe"]


@pytest.mark.parametrize("family, dtype, extra", OTHER_FAMILIES + [
    ("qwen3_moe", torch.float32, {"tie_word_embeddings": True}),  # no lm_head.weight in the checkpoint
    ("qwen3_moe", torch.bfloat16, {}), ("deepseek_v3", torch.bfloat16, {}),  # model.dtype=auto: bf16 kept
])
def test_every_family_streams(family, dtype, extra, calib_files, tmp_path):
    source = _source(tmp_path, family, dtype, **extra)
    metrics = {}
    for name, more in (("memory", ()), ("streamed", ("model.stream=true",))):
        metrics[name] = run(_cfg(source, calib_files, tmp_path / "cache", "ream_official", "model.dtype=auto", *more),
                            tmp_path / name)
    assert_same_checkpoint(tmp_path / "memory" / "checkpoint", tmp_path / "streamed" / "checkpoint")
    assert metrics["memory"]["weights"] == metrics["streamed"]["weights"]  # measured on the files (docs/bytes.md)
    assert metrics["memory"]["weights"]["expert_bytes"] is not None
    memory, streamed = metrics["memory"], metrics["streamed"]  # tied weights once in the streamed skeleton too
    assert memory["params_before"] == streamed["params_before"] == memory["weights_before"]["params"]
    assert memory["params_after"] == streamed["params_after"] == memory["weights"]["params"]


def _materialised_layers(model) -> list[int]:
    return [i for i, layer in enumerate(decoder_layers(model))
            if any(p.device.type != "meta" for p in layer.parameters())]


@pytest.mark.parametrize("method", ["ream_official", "freq"])
def test_one_decoder_layer_in_memory_at_a_time(method, calib_files, tmp_path, monkeypatch):
    loaded = []

    def checked(original):
        def load(self, index):
            original(self, index)
            present = _materialised_layers(self.model)
            assert present == [index], f"decoder layers {present} in memory while loading layer {index}"
            loaded.append(index)
        return load

    monkeypatch.setattr(LayerStream, "load", checked(LayerStream.load))
    source = _source(tmp_path, "qwen3_moe")
    run(_cfg(source, calib_files, tmp_path / "cache", method, "model.stream=true"), tmp_path / "run")
    assert sorted(set(loaded)) == [0, 1, 2, 3]
    assert (tmp_path / "run" / "checkpoint" / "config.json").exists()


def test_loaded_layers_do_not_keep_the_shard_mapped(tmp_path):
    """Tensors loading leaves in the memory-mapped shard (attention, norms, router: not converted) get
    storage of their own, so neither the mapping nor the pages read through it outlive the load."""
    from omegaconf import OmegaConf

    source = _source(tmp_path, "qwen3_moe")
    stream = LayerStream.open(OmegaConf.create({"path": str(source), "dtype": "float32"}), "cpu", tmp_path / "run",
                              "digest")
    for index in range(4):
        stream.load(index)
        loaded = {n: t for n, t in stream.model.state_dict(keep_vars=True).items() if t.device.type != "meta"}
        assert any(".layers." in n for n in loaded)
        mapped = [n for n, t in loaded.items() if not t.untyped_storage().resizable()]
        assert not mapped, f"left in the shard's mapping: {mapped}"
        stream.release(index)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
@pytest.mark.parametrize("source_dtype, run_dtype", [(torch.bfloat16, "float32"), (torch.float32, "float32"),
                                                     (torch.float32, "bfloat16")])
def test_layers_load_as_from_pretrained_loads_them(family, source_dtype, run_dtype, tmp_path, monkeypatch):
    """Each decoder layer the stream loads equals from_pretrained's in the run's dtype, bit for bit; the
    fused expert tensors (every family but GPT-OSS, whose checkpoint holds them fused) are read expert by
    expert, never through transformers' stacking of every expert's converted tensor."""
    from omegaconf import OmegaConf
    from transformers.core_model_loading import MergeModulelist

    source = _source(tmp_path, family, source_dtype)
    dtype = getattr(torch, run_dtype)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).state_dict()
    stacked = []
    monkeypatch.setattr(MergeModulelist, "convert", lambda *a, **k: stacked.append(a))
    stream = LayerStream.open(OmegaConf.create({"path": str(source), "dtype": run_dtype}), "cpu", tmp_path / "run",
                              "digest")
    for index in range(4):
        stream.load(index)
        loaded = {n: t for n, t in stream.model.state_dict().items() if f".layers.{index}." in n}
        assert loaded and loaded.keys() <= reference.keys()
        for name, t in loaded.items():
            assert t.dtype == reference[name].dtype and torch.equal(t, reference[name]), name
        stream.release(index)
    assert not stacked


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("method", ["ream_official", "ream_nonseq", "hc_smoe", "freq"])
def test_killed_run_resumes_to_the_same_checkpoint(method, calib_files, tmp_path, monkeypatch):
    """The relaunch recomputes the hidden states at the boundary (the reference run has its own cache, so
    non-sequential methods find the killed attempt's layer observations only for finished layers)."""
    source = _source(tmp_path, "qwen3_moe")
    run(_cfg(source, calib_files, tmp_path / "cache-ref", method, "model.stream=true"), tmp_path / "uninterrupted")
    cfg = _cfg(source, calib_files, tmp_path / "cache", method, "model.stream=true")

    original = LayerStream.finished
    written = []

    def dies_after_layer_2(self, index, plan=None):
        original(self, index, plan)
        written.append(index)
        if index == 2:  # layers 0 (MoE), 1 (dense) and 2 (MoE) are on disk, layer 3 is not
            raise Killed("killed after layer 2")

    monkeypatch.setattr(LayerStream, "finished", dies_after_layer_2)
    with pytest.raises(Killed):
        run(cfg, tmp_path / "run")
    partial = tmp_path / "run" / PARTIAL
    assert json.loads((partial / PROGRESS).read_text())["layers"].keys() == {"0", "1", "2"}

    monkeypatch.setattr(LayerStream, "finished", lambda self, index, plan=None: (written.append(index),
                                                                               original(self, index, plan)))
    written.clear()
    read = []
    for name in ("load", "load_written"):
        monkeypatch.setattr(LayerStream, name, lambda self, index, f=getattr(LayerStream, name), n=name: (
            read.append((n, index)), f(self, index)))
    run(cfg, tmp_path / "run")
    assert written == [3], "the relaunch redid finished layers"
    sequential = method == "ream_official"
    # the boundary's hidden states come from running layers 0..2 again: compressed ones read back from their
    # shards (sequential), original ones (non-sequential); the dense layer 1 as written
    expected = [("load_written" if sequential else "load", 0), ("load_written", 1),
                ("load_written" if sequential else "load", 2), ("load", 3)]
    assert read == expected
    assert_same_checkpoint(tmp_path / "uninterrupted" / "checkpoint", tmp_path / "run" / "checkpoint")
    assert not partial.exists()
    assert list((tmp_path / "run" / "attempts").glob("*/error.txt")), "the failed attempt's error is kept aside"


REPO = Path(__file__).resolve().parents[1]


def assert_identical_files(a: Path, b: Path) -> None:
    """Every safetensors shard and the index byte for byte (names too), beside assert_same_checkpoint."""
    names = sorted(f.name for f in a.glob("*.safetensors")) + [INDEX]
    assert names[:-1] == sorted(f.name for f in b.glob("*.safetensors"))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert_same_checkpoint(a, b)


def _written_layers(run_dir: Path) -> set[str]:
    try:
        return set(json.loads((run_dir / PARTIAL / PROGRESS).read_text())["layers"])
    except (OSError, ValueError, KeyError):
        return set()


@pytest.mark.parametrize("method", ["ream_official", "freq"])
def test_sigkilled_run_resumes_to_the_identical_checkpoint(method, calib_files, tmp_path, caplog):
    """A run in its own process is killed with SIGKILL (no handler, no cleanup, its lock still held) once
    layers 0..2 of 4 are on disk; the relaunch takes over the run directory, continues at layer 3 and
    writes the checkpoint of an uninterrupted run, byte for byte."""
    source = _source(tmp_path, "qwen3_moe")
    run(_cfg(source, calib_files, tmp_path / "cache-ref", method, "model.stream=true"), tmp_path / "uninterrupted")
    overrides = _overrides(source, calib_files, tmp_path / "cache", method, "model.stream=true")
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-m", "tests.stream_child", str(run_dir), "2", *overrides],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while _written_layers(run_dir) != {"0", "1", "2"}:  # the child waits after layer 2 until killed
            assert child.poll() is None, f"the run ended before layer 2 was written:\n{child.stdout.read()}"
            assert time.monotonic() < deadline, "layer 2 was not written in time"
            time.sleep(0.2)
        assert json.loads((run_dir / ".lock-holder.json").read_text())["pid"] == child.pid
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    assert not (run_dir / "checkpoint").exists() and not (run_dir / "metrics.json").exists()
    assert (run_dir / ".lock-holder.json").exists(), "the killed holder could not clean up"

    written = []
    original = LayerStream.finished
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.WARNING, logger="ream_exp"):
        mp.setattr(LayerStream, "finished", lambda self, index, plan=None: (written.append(index),
                                                                           original(self, index, plan)))
        metrics = run(make_cfg(*overrides), run_dir)
    assert written == [3], "the relaunch redid finished layers"
    assert f"took over the lock of pid {child.pid}" in caplog.text
    assert "continuing from its finished layers" in caplog.text
    assert metrics["status"] == "done" and not (run_dir / ".lock-holder.json").exists()
    assert_identical_files(tmp_path / "uninterrupted" / "checkpoint", run_dir / "checkpoint")
    assert not (run_dir / PARTIAL).exists()


def test_partial_output_of_another_config_is_set_aside(calib_files, tmp_path, monkeypatch):
    source = _source(tmp_path, "qwen3_moe")
    monkeypatch.setattr(LayerStream, "finished", lambda *a, **k: (_ for _ in ()).throw(Killed("at once")))
    with pytest.raises(Killed):
        run(_cfg(source, calib_files, tmp_path / "cache", "ream_official", "model.stream=true"), tmp_path / "run")
    assert (tmp_path / "run" / PARTIAL / PROGRESS).exists()
    monkeypatch.undo()
    run(_cfg(source, calib_files, tmp_path / "cache", "freq", "model.stream=true"), tmp_path / "run")
    kept = list((tmp_path / "run" / "attempts").glob(f"*/{PARTIAL}/{PROGRESS}"))
    assert len(kept) == 1 and (tmp_path / "run" / "checkpoint" / "config.json").exists()


@pytest.mark.parametrize("override, message", [
    (("save=false",), "save=true"),
    (("model.device_map=auto",), "model.device_map=null"),
    (("model.stream=yes",), "true or false"),
])
def test_settings_streaming_cannot_honour_are_refused(override, message, calib_files, tmp_path):
    source = _source(tmp_path, "qwen3_moe")
    stream = () if override[0].startswith("model.stream") else ("model.stream=true",)
    with pytest.raises(ConfigError, match=message):
        validate(_cfg(source, calib_files, tmp_path / "cache", "freq", *stream, *override))


@pytest.mark.slow
def test_streamed_run_evaluates_the_written_checkpoint(calib_files, tmp_path, monkeypatch):
    """The streamed model is not in memory after compression: evaluation reloads the written checkpoint.
    The whole original model is never loaded: without a cached baseline the run is refused before any load,
    naming the method=none command; once that run has cached it, the streamed run reports it and scores
    as the in-memory run scores."""
    import ream_exp.run as run_module
    from tests.test_run import TINY_TASKS

    source = _source(tmp_path, "qwen3_moe")
    evaluation = ("eval=mc", "eval.name=tiny", "eval.tasks=[tiny_mc]", f"eval.include_path={TINY_TASKS}",
                  "eval.batch_size=4", "baseline=true")
    memory = run(_cfg(source, calib_files, tmp_path / "cache-memory", "reap", *evaluation), tmp_path / "memory")
    streamed = _cfg(source, calib_files, tmp_path / "cache-streamed", "reap", *evaluation, "model.stream=true")
    loads = []
    real_load = run_module.load_model
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: loads.append(a[0].path) or real_load(*a, **k))
    with pytest.raises(ConfigError, match="model.stream=true never holds the whole model.*method=none"):
        run(streamed, tmp_path / "refused")
    assert loads == []
    run(_cfg(source, calib_files, tmp_path / "cache-streamed", "none", *evaluation), tmp_path / "none")
    loads.clear()
    result = run(streamed, tmp_path / "streamed")
    assert [Path(str(p)) for p in loads] == [tmp_path / "streamed" / "checkpoint"]  # the compressed model only
    assert result["eval"]["tasks"] == memory["eval"]["tasks"]
    assert result["baseline"] == memory["baseline"]
    assert "baseline_eval" not in result["timings"]


@pytest.mark.parametrize("method", ["ream_official", "freq"])
@pytest.mark.parametrize("manifest", ["kept", "another run", "removed", "damaged file"])
def test_resume_reads_kept_states_instead_of_rerunning_finished_layers(method, manifest, calib_files, tmp_path,
                                                                        monkeypatch):
    """With calib.states_dir kept, a relaunch whose manifest names this run and boundary reads the hidden
    states at layer 3 from disk: no finished layer is loaded or run again. A manifest of another run (or
    none, or a damaged file) is not trusted: the layers run again. Every path ends with the uninterrupted
    run's checkpoint."""
    from ream_exp.methods import capture
    from ream_exp.methods.states import MANIFEST

    source = _source(tmp_path, "qwen3_moe")
    states_dir = tmp_path / "states"  # the reference run too (config.json records it), before the others
    kept = ("model.stream=true", "calib.states_device=disk", f"calib.states_dir={states_dir}")
    run(_cfg(source, calib_files, tmp_path / "cache-ref", method, *kept), tmp_path / "uninterrupted")
    cfg = _cfg(source, calib_files, tmp_path / "cache", method, *kept)

    original_load = LayerStream.load

    def dies_loading_layer_3(self, index):
        if index == 3:  # layers 0..2 are written and the states sealed as layer 3's input
            raise Killed("killed before layer 3")
        original_load(self, index)

    monkeypatch.setattr(LayerStream, "load", dies_loading_layer_3)
    with pytest.raises(Killed):
        run(cfg, tmp_path / "run")
    sealed = json.loads((states_dir / MANIFEST).read_text())
    progress = json.loads((tmp_path / "run" / PARTIAL / PROGRESS).read_text())
    assert sealed["owner"] == {"config": progress["config"], "run": progress["run"], "boundary": 3}
    if manifest == "another run":
        sealed["owner"]["run"] = "0" * 32
        (states_dir / MANIFEST).write_text(json.dumps(sealed))
    elif manifest == "removed":
        (states_dir / MANIFEST).unlink()
    elif manifest == "damaged file":  # same size, not what torch.save wrote
        damaged = states_dir / "batch0-hidden.pt"
        damaged.write_bytes(bytes(damaged.stat().st_size))
    monkeypatch.undo()

    read, forwarded = [], []
    for name in ("load", "load_written"):
        monkeypatch.setattr(LayerStream, name, lambda self, index, f=getattr(LayerStream, name), n=name: (
            read.append((n, index)), f(self, index)))
    run_layer = capture.run_decoder_layer
    monkeypatch.setattr(capture, "run_decoder_layer", lambda layer, hidden, args: (
        forwarded.append(layer.self_attn.layer_idx), run_layer(layer, hidden, args))[1])
    run(cfg, tmp_path / "run")
    if manifest == "kept":
        assert read == [("load", 3)] and set(forwarded) == {3}, "finished layers were run again"
    else:
        assert {i for _, i in read} == {0, 1, 2, 3} and set(forwarded) == {0, 1, 2, 3}
    assert_identical_files(tmp_path / "uninterrupted" / "checkpoint", tmp_path / "run" / "checkpoint")
