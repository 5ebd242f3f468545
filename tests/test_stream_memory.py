"""What keeps a streamed run's memory near one decoder layer (docs/models.md, "The scale rehearsal"): tensors
converted on reading a bounded piece at a time, each in the dtype transformers gives it; pruned experts
dropped in place; fused tensors written as views. Each is checked for its values (bit for bit the old
path's) and for the copy it avoids."""

from __future__ import annotations

import weakref

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from ream_exp import weight_files
from ream_exp.methods.layer_stream import LayerStream
from ream_exp.moe import surgery
from ream_exp.run import run
from ream_exp.weight_files import ShardReader
from tests.test_stream import _cfg, _source, assert_same_checkpoint


@pytest.mark.parametrize("file_dtype, out_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                   (torch.float16, torch.float32)])
def test_converting_on_reading_holds_one_piece(file_dtype, out_dtype, tmp_path, monkeypatch):
    torch.manual_seed(0)
    t = torch.randn(37, 29).to(file_dtype)
    save_file({"t": t}, str(tmp_path / "a.safetensors"))
    monkeypatch.setattr(weight_files, "CONVERT_CHUNK", 256)
    pieces = []
    read = ShardReader._read
    monkeypatch.setattr(ShardReader, "_read", lambda self, name, begin, target: (pieces.append(target.nbytes),
                                                                                   read(self, name, begin, target)))
    out = torch.empty(t.shape, dtype=out_dtype)
    with ShardReader(tmp_path / "a.safetensors") as shard:
        shard.read_into("t", out)
        lazy = shard.lazy("t", out_dtype)[...]
    expected = t.to(out_dtype)
    assert torch.equal(out, expected) and torch.equal(lazy, expected) and lazy.dtype == out_dtype
    assert len(pieces) > 2 and max(pieces) <= 256 and sum(pieces) == 2 * t.nbytes


def test_tensors_come_to_transformers_in_their_dtype(tmp_path, monkeypatch):
    """A bf16 checkpoint loaded in float32: every tensor transformers only renames is read as float32 (its
    own conversion then copies nothing) and equals from_pretrained's; none is memory-mapped."""
    from transformers import AutoModelForCausalLM

    source = _source(tmp_path, "qwen3_moe", torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    given = {}
    getitem = weight_files.LazyTensor.__getitem__

    def spy(self, index):
        out = getitem(self, index)
        given[self.name] = out.dtype
        return out

    monkeypatch.setattr(weight_files.LazyTensor, "__getitem__", spy)
    stream = LayerStream.open(OmegaConf.create({"path": str(source), "dtype": "float32"}), "cpu", tmp_path / "run",
                              "digest")
    stream.load(0)
    state = stream.model.state_dict(keep_vars=True)
    renamed = [k for k in given if k in state]
    assert renamed and any(".layers.0." in k for k in renamed) and "model.embed_tokens.weight" in renamed
    for k in renamed:
        assert given[k] == state[k].dtype == torch.float32 and torch.equal(state[k], reference[k]), k
        assert state[k].untyped_storage().resizable(), k  # torch's memory, not a mapped file's


def _experts(n=8, rows=6, cols=4096):
    m = nn.Module()
    torch.manual_seed(0)
    m.w = nn.Parameter(torch.randn(n, rows, cols), requires_grad=False)
    m.b = nn.Parameter(torch.randn(n, 3), requires_grad=False)
    return m


def test_pruned_experts_are_kept_in_place(monkeypatch):
    monkeypatch.setattr(surgery, "IN_PLACE_MIN_BYTES", 0)
    m = _experts()
    reference = {k: v.detach().clone() for k, v in m.named_parameters()}
    pointer = m.w.data_ptr()
    keep = torch.tensor([0, 2, 3, 6])
    surgery._slice_expert_dim(m, keep, 8)
    for k, v in m.named_parameters():
        assert torch.equal(v, reference[k][keep]) and v.is_contiguous(), k
    assert m.w.data_ptr() == pointer  # no second copy: the kept rows moved within the parameter's memory
    assert not m.w.requires_grad


@pytest.mark.parametrize("case", ["view alive", "reference alive", "unsorted", "below the size"])
def test_pruned_experts_are_copied_where_moving_them_would_show(case, monkeypatch):
    monkeypatch.setattr(surgery, "IN_PLACE_MIN_BYTES", 10 ** 12 if case == "below the size" else 0)
    m = _experts()
    reference = m.w.detach().clone()
    held = {"view alive": lambda: m.w.data[1], "reference alive": lambda: m.w}.get(case, lambda: None)()
    keep = torch.tensor([3, 1, 5] if case == "unsorted" else [1, 5, 6])
    pointer = m.w.data_ptr()
    surgery._slice_expert_dim(m, keep, 8)
    assert torch.equal(m.w, reference[keep]) and m.w.data_ptr() != pointer
    if held is not None:  # what another holder sees is unchanged
        assert torch.equal(held, reference[1] if case == "view alive" else reference)


@pytest.mark.parametrize("method", ["freq", "ream_official"])
def test_streamed_run_slicing_in_place_equals_in_memory(method, calib_files, tmp_path, monkeypatch):
    """The in-memory run with the copying slice (tiny tensors: below IN_PLACE_MIN_BYTES) against a streamed
    run that slices every expert tensor in place: the same checkpoint, bit for bit."""
    source = _source(tmp_path, "qwen3_moe")
    run(_cfg(source, calib_files, tmp_path / "cache", method), tmp_path / "memory")
    moved = []
    keep_rows = surgery._keep_rows_in_place
    monkeypatch.setattr(surgery, "IN_PLACE_MIN_BYTES", 0)

    def spy(module, name, keep):
        kept = keep_rows(module, name, keep)
        if kept is not None:
            moved.append(name)
        return kept

    monkeypatch.setattr(surgery, "_keep_rows_in_place", spy)

    run(_cfg(source, calib_files, tmp_path / "cache", method, "model.stream=true"), tmp_path / "streamed")
    assert_same_checkpoint(tmp_path / "memory" / "checkpoint", tmp_path / "streamed" / "checkpoint")
    assert {"gate_up_proj", "down_proj"} <= set(moved)


def test_written_expert_tensors_are_views_of_the_fused_ones(tmp_path):
    """What a layer's shard gets equals transformers' own reverse conversion (names and bits), and each
    expert's gate and up are views of the fused gate_up_proj (transformers' Chunk copies them)."""
    from transformers.core_model_loading import revert_weight_conversion

    source = _source(tmp_path, "qwen3_moe")
    stream = LayerStream.open(OmegaConf.create({"path": str(source), "dtype": "float32"}), "cpu", tmp_path / "run",
                              "digest")
    stream.load(0)
    prefix = "model.layers.0."
    written = stream._state_dict(lambda k: k.startswith(prefix))
    state = {k: v for k, v in stream.model.state_dict().items() if k.startswith(prefix)}
    stream.model._weight_conversions = [c for c in stream.mapping if c.was_used()]
    stock = {k: v.contiguous() for k, v in revert_weight_conversion(stream.model, state).items()}
    assert written.keys() == stock.keys()
    for k in stock:
        assert written[k].dtype == stock[k].dtype and torch.equal(written[k], stock[k]), k
    fused = stream.model.model.layers[0].mlp.experts.gate_up_proj
    storage = fused.untyped_storage().data_ptr()
    gate_up = [k for k in written if k.endswith(("gate_proj.weight", "up_proj.weight")) and ".experts." in k]
    assert gate_up and all(written[k].untyped_storage().data_ptr() == storage for k in gate_up)
    assert all(stock[k].untyped_storage().data_ptr() != storage for k in gate_up)


@pytest.mark.parametrize("dtype, extra", [(torch.float32, ()),
                                          (torch.bfloat16, ("model.dtype=auto", "method.align=weights"))])
def test_alignment_pca_runs_with_the_experts_spilled(dtype, extra, calib_files, tmp_path, monkeypatch):
    """A streamed run builds the alignment PCA's features from its layer's experts read back one expert at a time
    (SPILL_BLOCK below one expert's bytes) and reduces them with no expert tensor of the model in memory; it then
    reads the experts back: the same checkpoint as the in-memory run, bit for bit."""
    from ream_exp.methods import layer_stream

    source = _source(tmp_path, "qwen3_moe", dtype)
    run(_cfg(source, calib_files, tmp_path / "cache", "ream_official", *extra), tmp_path / "memory")
    streams, during_pca, blocks, freed = [], [], [], []
    init, pca, read, to_meta = LayerStream.__init__, torch.pca_lowrank, layer_stream.read_stacked, layer_stream._to_meta

    def opened(self, *args, **kwargs):
        init(self, *args, **kwargs)
        streams.append(self)

    def spy(x, *args, **kwargs):
        real = [n for n, p in streams[-1].model.named_parameters() if ".experts." in n and p.device.type != "meta"]
        during_pca.append(real + [f() for f in freed if f() is not None])
        return pca(x, *args, **kwargs)

    def released(model, name, tensor):  # every expert tensor freed before the PCA (no reference left)
        if ".experts." in name and tensor.device.type != "meta":
            freed.append(weakref.ref(tensor))
        to_meta(model, name, tensor)

    def reading(target, files, like, device):
        blocks.append(like.shape[0])
        return read(target, files, like, device)

    monkeypatch.setattr(LayerStream, "__init__", opened)
    monkeypatch.setattr(torch, "pca_lowrank", spy)
    monkeypatch.setattr(layer_stream, "read_stacked", reading)
    monkeypatch.setattr(layer_stream, "_to_meta", released)
    monkeypatch.setattr(layer_stream, "SPILL_BLOCK", 1)
    run(_cfg(source, calib_files, tmp_path / "cache", "ream_official", "model.stream=true", *extra),
        tmp_path / "streamed")
    assert during_pca == [[], [], []]  # three MoE layers (layer 1 is dense), each PCA without the experts
    assert blocks.count(1) == 3 * 8 * 2  # per MoE layer: its 8 experts one at a time, gate_up_proj and down_proj
    assert_same_checkpoint(tmp_path / "memory" / "checkpoint", tmp_path / "streamed" / "checkpoint")
