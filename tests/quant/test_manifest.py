"""The typed manifest and the byte math every part counts with."""

import json

import pytest

from quant.manifest import (Manifest, ManifestError, ShardRange, expert_unit_bytes, kv_bytes_per_token, parse_bytes,
                            shard_weight_bytes)


def _manifest(**cfg) -> dict:
    c = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, **cfg}
    t = {"model.layers.0.mlp.down_proj.qweight": {"shape": [64, 128], "dtype": "int8"},
         "model.layers.1.mlp.down_proj.wmask": {"shape": [64, 16], "dtype": "uint8", "resident_bytes": 64 * 128},
         "model.layers.1.mlp.down_proj.wvals": {"shape": [100], "dtype": "int8", "resident_bytes": 0},
         "lm_head.qweight": {"shape": [100, 64], "dtype": "int8"}, "model.norm.weight": {"shape": [64], "dtype": "float32"}}
    return {"model_type": "llama", "model_config": c, "tensors": t, "files": {"a": {"sha256": "0" * 64, "bytes": 3}}}


def test_dims_shards_and_resident_bytes():
    m = Manifest.from_dict(_manifest())
    assert (m.n_layers, m.dims.kv_heads, m.dims.head_dim, m.moe) == (2, 2, 16, None)
    assert shard_weight_bytes(m, ShardRange(0, 1, False, False)) == 64 * 128
    assert shard_weight_bytes(m, ShardRange(1, 2, False, False)) == 64 * 128  # sparse: dense in memory, not file bytes
    assert shard_weight_bytes(m, ShardRange(0, 0, True, False)) == 100 * 64  # tied: lm_head's rows on the first stage
    assert shard_weight_bytes(m, ShardRange(0, 0, False, True)) == 100 * 64 + 64 * 4
    assert m.kv_bytes_per_token(2) == kv_bytes_per_token(2, 2, 16) == 2 * 2 * 2 * 16 * 4


def test_the_kv_cache_reserves_what_the_planner_counts():
    from workers.llama_stage import KVCache, LlamaDims

    dims = LlamaDims(hidden=64, heads=4, kv_heads=2, head_dim=16, eps=1e-5, rope_theta=10000.0)
    m = Manifest.from_dict(_manifest())
    assert KVCache.size_bytes(3, dims, 50) == m.kv_bytes_per_token(3) * 50 == KVCache(3, dims, 50).nbytes


def test_moe_shape_and_expert_units():
    d = _manifest(num_local_experts=4, num_experts_per_tok=2)
    d["tensors"]["model.layers.0.mlp.experts.gate_up_qweight"] = {"shape": [4, 256, 64], "dtype": "int8"}
    d["tensors"]["model.layers.0.mlp.experts.gate_up_scale"] = {"shape": [4, 256], "dtype": "float32"}
    m = Manifest.from_dict(d)
    assert (m.moe.experts, m.moe.top_k) == (4, 2)
    assert expert_unit_bytes(m, 0) == 256 * 64 + 256 * 4 and expert_unit_bytes(m, 1) == 0
    assert shard_weight_bytes(m, ShardRange(0, 1, False, False)) == 64 * 128  # experts load unit by unit, apart


def test_a_manifest_without_its_fields_is_refused_clearly(tmp_path):
    bad = _manifest()
    del bad["model_config"]["hidden_size"]
    with pytest.raises(ManifestError, match="hidden_size"):
        Manifest.from_dict(bad)
    with pytest.raises(ManifestError, match="tensors"):
        Manifest.from_dict({k: v for k, v in _manifest().items() if k != "tensors"})
    from quant.checkpoint import FORMAT_VERSION, MANIFEST, CheckpointError, read_manifest

    (tmp_path / MANIFEST).write_text(json.dumps({**bad, "format": "edgeweave-quantized", "format_version": FORMAT_VERSION}))
    with pytest.raises(CheckpointError, match=MANIFEST):
        read_manifest(tmp_path)


@pytest.mark.parametrize("text,n", [("300MB", 300_000_000), ("1.5GiB", 1610612736), ("64mib", 64 << 20),
                                    ("1000", 1000), ("2 kb", 2000), (7, 7)])
def test_sizes_users_type(text, n):
    assert parse_bytes(text) == n


def test_a_size_that_is_not_one():
    with pytest.raises(ValueError, match="cannot read"):
        parse_bytes("lots")
