"""Quantization in bounded memory (quant/stream.py) gives the in-memory pipeline's checkpoint exactly,
and refuses bad model directories with errors naming the file."""

from __future__ import annotations

import json

import pytest
import torch

from quant.checkpoint import read_manifest, save_checkpoint
from quant.config import QuantConfig
from quant.models import load_float_model
from quant.pipeline import quantize
from quant.sources import SourceError, open_source
from quant.stream import quantize_streaming, whole_model_reason
from tests.conftest import VOCAB, tiny_model, tiny_tokenizer


def _hf_dir(tmp_path, arch: str, dtype=torch.float32, shard: str = "40KB"):
    model = tiny_model(arch, seed=3, layers=3, init_range=0.2).to(dtype)
    d = tmp_path / f"{arch}-hf"
    model.save_pretrained(d, max_shard_size=shard)  # several shards + model.safetensors.index.json
    tiny_tokenizer().save_pretrained(d)
    return d


def _same_checkpoint(a, b) -> None:
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma.tensors == mb.tensors and ma.modules == mb.modules and ma.choices == mb.choices
    weights = {k: v for k, v in ma.files.items() if k.endswith(".safetensors")}
    assert len(weights) == ma.n_layers + 1  # one file per decoder layer, plus the embedding/head file
    assert weights == {k: v for k, v in mb.files.items() if k.endswith(".safetensors")}  # same bytes (sha256)


@pytest.mark.parametrize("arch,method,scheme", [("llama", "haq", "token"), ("llama", "rtn", "tensor"),
                                                ("mixtral", "haq", "token"), ("opt", "tender", "tender")])
def test_streaming_checkpoint_is_the_in_memory_one(tmp_path, arch, method, scheme):
    d = _hf_dir(tmp_path, arch)
    assert (d / "model.safetensors.index.json").is_file()
    calib = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    cfg = QuantConfig(method=method, act_scheme=scheme, search_tokens=128)
    model, tok = load_float_model(str(d))
    mem = save_checkpoint(model, tok, cfg, quantize(model, cfg, calib, progress=False), tmp_path / "mem")
    res = quantize_streaming(open_source(str(d)), cfg, calib, tmp_path / "stream", progress=False)
    _same_checkpoint(mem, res.path)
    assert res.peak_rss_bytes > 0 and res.layers == 3


def test_streaming_reads_bf16_shards(tmp_path):
    d = _hf_dir(tmp_path, "llama", torch.bfloat16)
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    res = quantize_streaming(open_source(str(d)), QuantConfig(method="rtn"), calib, tmp_path / "ck", progress=False)
    assert read_manifest(res.path).tensors["model.layers.2.mlp.down_proj.qweight"].file == "layers/00002.safetensors"


def test_missing_shard_and_mismatched_index_are_named(tmp_path):
    d = _hf_dir(tmp_path, "llama")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    moved = d / shard
    moved.rename(d / "elsewhere")
    with pytest.raises(SourceError, match=f"{shard}.*missing"):
        open_source(str(d))
    (d / "elsewhere").rename(moved)
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = next(s for s in sorted(set(index["weight_map"].values()))
                                     if s != index["weight_map"][name])  # a shard that does not hold it
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SourceError, match=f"tensor {name}"):
        open_source(str(d))


def test_unreadable_dtype_is_named(tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "int"
    d.mkdir()
    tiny_model("llama").config.save_pretrained(d)
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4, dtype=torch.int8)}, str(d / "model.safetensors"))
    with pytest.raises(SourceError, match="model.embed_tokens.weight is I8"):
        open_source(str(d))


def test_a_failed_run_leaves_no_checkpoint(tmp_path):
    d = _hf_dir(tmp_path, "llama")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    last = index["weight_map"]["model.layers.2.mlp.down_proj.weight"]
    from safetensors.torch import load_file, save_file

    part = load_file(str(d / last))
    part["model.layers.2.mlp.down_proj.weight"] = torch.zeros(3, 3)  # the wrong shape, found at layer 2
    save_file(part, str(d / last))
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    with pytest.raises(SourceError, match="down_proj.weight is \\(3, 3\\)"):
        quantize_streaming(open_source(str(d)), QuantConfig(method="rtn"), calib, tmp_path / "ck", progress=False)
    assert not (tmp_path / "ck").exists()


def test_whole_model_methods_say_so():
    assert whole_model_reason(QuantConfig(method="haq")) is None
    assert "end to end" in whole_model_reason(QuantConfig(method="mobilequant", act_scheme="tensor"))
    assert "--kd-steps" in whole_model_reason(QuantConfig(method="haq", kd_steps=2))


def test_cli_refuses_a_whole_model_method_over_the_limit(tmp_path):
    from orchestrator.cli import main

    d = _hf_dir(tmp_path, "llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"t{i % 200 + 2}" for i in range(4000)))
    with pytest.raises(SystemExit, match="trained end to end.*over --whole-model-limit"):
        main(["quantize", str(d), "--method", "mobilequant", "--calib", str(calib), "--calib-samples", "2",
              "--calib-len", "16", "--whole-model-limit", "1KB", "--out", str(tmp_path / "mq")])
    assert not (tmp_path / "mq").exists()
    assert main(["quantize", str(d), "--method", "rtn", "--calib", str(calib), "--calib-samples", "2",
                 "--calib-len", "16", "--out", str(tmp_path / "rtn")]) == 0
    assert read_manifest(tmp_path / "rtn").method["method"] == "rtn"
