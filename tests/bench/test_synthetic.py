"""The scale benchmark's generator at a small shape: the bf16 directory streams through the quantizer,
the plan splits it over nodes none of which could hold half of it, the shards chained give the
one-process tokens, and the GGUF holds the same weights (llama.cpp's layout undone on reading)."""

from __future__ import annotations

from dataclasses import replace

import torch

from bench.synthetic import SMALL, tensor_shapes, write_gguf_q8_0, write_hf_model
from quant.calibration import default_calibration_path
from quant.checkpoint import read_manifest
from quant.config import QuantConfig
from quant.manifest import ShardRange
from quant.sources import open_source
from quant.stream import quantize_streaming
from orchestrator.planner import PlanOptions, plan
from workers.profile import NodeProfile
from workers.shard import load_shard


def _greedy(shards, prompt: list[int], n: int) -> list[int]:
    caches = [s.stage.new_cache(64) for s in shards]
    x, out = torch.tensor(prompt), []
    for _ in range(n):
        h = shards[0].embed(x)
        for s, c in zip(shards, caches):
            h = s.stage.forward(h, c)
        out.append(int(shards[-1].head(h[-1:])[0].argmax()))
        x = torch.tensor([out[-1]])
    return out


SIX = replace(SMALL, layers=6)  # enough layers that a node of under half the model holds a stage


def test_small_shape_streams_splits_and_serves_identically(tmp_path):
    hf = write_hf_model(tmp_path / "hf", SIX, default_calibration_path(), progress=False)
    src = open_source(str(hf))
    assert src.stored_bytes() == 2 * sum(torch.Size(s).numel() for _, _, s in tensor_shapes(SIX))
    calib = torch.randint(3, SMALL.vocab, (4, 32), generator=torch.Generator().manual_seed(0))
    ck = quantize_streaming(src, QuantConfig(method="rtn"), calib, tmp_path / "ck", progress=False).path
    m = read_manifest(ck)
    model_bytes = sum(t.file_bytes for t in m.tensors.values())
    budget = int(model_bytes * 0.49)
    nodes = [NodeProfile(f"n{i}", "cpu", budget, 10.0) for i in range(4)]
    p = plan(m, nodes, PlanOptions(context=64, batch=1, prefill_chunk=16))
    assert len(p.stages) >= 3 and all(s.used_bytes <= s.budget_bytes < model_bytes / 2 for s in p.stages)
    shards = [load_shard(ck, ShardRange(s.first, s.last, s.embed, s.head), 64) for s in p.stages]
    assert sum(s.weight_bytes for s in shards) == model_bytes  # each tensor in exactly one shard
    whole = load_shard(ck, ShardRange(0, SIX.layers, True, True), 64)
    assert _greedy(shards, [1, 50, 60, 70], 12) == _greedy([whole], [1, 50, 60, 70], 12)


def test_gguf_holds_the_same_weights(tmp_path):
    hf = write_hf_model(tmp_path / "hf", SMALL, default_calibration_path(), progress=False)
    g = write_gguf_q8_0(hf, tmp_path / "m.gguf", progress=False)
    bf16, q8 = open_source(str(hf)), open_source(str(g))
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.2.mlp.down_proj.weight", "lm_head.weight", "model.norm.weight"):
        a, b = bf16.get(name), q8.get(name)
        assert a.shape == b.shape
        assert (a - b).abs().max() <= a.abs().max() / 127 + 1e-6, name  # Q8_0 rounding only
