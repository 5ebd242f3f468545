"""The scale benchmark (ream_exp/bench/scale.py) on a tiny shape: it builds the checkpoint, streams each
method through the real run, meters every decoder layer, extrapolates and reports departures from
Qwen3-30B-A3B's shape."""

import json

import pytest

from ream_exp.bench import scale as bench_scale

TINY = ["--device", "cpu", "--layers", "3", "--n", "4", "--seq-len", "32", "--batch-size", "4", "--hidden", "64",
        "--experts", "8", "--top-k", "2", "--width", "32", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
        "--vocab", "112"]


def test_defaults_are_qwen3_30b_shape():
    args = bench_scale._args(["--device", "cpu"])
    assert bench_scale.departures(args) == {}
    assert (args.layers, args.n, args.seq_len, args.dtype) == (2, 8, 256, "float32")
    assert bench_scale._args(["--device", "cuda"]).dtype == "bfloat16"


@pytest.mark.parametrize("method", ["freq", "ream_official"])
def test_measure_streams_and_meters_every_layer(method, tmp_path):
    args = bench_scale._args(TINY)
    layer_bytes = bench_scale.build(tmp_path, args)
    result = bench_scale.measure(tmp_path, args, method)
    assert [l["layer"] for l in result["layers"]] == [0, 1, 2]
    assert all(l["seconds"] > 0 for l in result["layers"])
    assert sum(l["seconds"] for l in result["layers"]) < result["seconds"]
    assert result["peak_bytes"] >= max(l["peak_bytes"] for l in result["layers"])
    config = json.loads((tmp_path / method / "checkpoint" / "config.json").read_text())
    assert config["num_experts"] == 6 and config["num_hidden_layers"] == 3  # 8 -> 6 at ratio 0.25

    e = bench_scale.extrapolate(result)
    per_layer = [l["seconds"] for l in result["layers"]]
    mean = sum(per_layer) / 3
    assert e["mean_layer_seconds"] == pytest.approx(mean)
    assert e["seconds"] == pytest.approx(result["seconds"] - sum(per_layer) + 48 * mean)

    text = bench_scale.report(args, layer_bytes, {method: result}, "test machine")
    assert "DEPARTS from Qwen3-30B-A3B's shape: hidden 64 (not 2048), experts 8 (not 128)" in text
    assert "~1.5 h sequential" in text and "~30 GB beyond" in text and "test machine" in text
    assert sum(line.startswith(method) for line in text.splitlines()) == 3
