import json

import pytest
import torch

from quant.checkpoint import MANIFEST, CheckpointError, load_checkpoint, read_manifest, save_checkpoint
from quant.config import QuantConfig
from quant.pipeline import quantize
from tests.conftest import tiny_checkpoint, tiny_model, tiny_tokenizer as _tokenizer


@pytest.fixture(params=["llama", "mixtral", "opt"])
def saved(request, tmp_path, calib_ids):
    model = tiny_model(request.param)
    cfg = QuantConfig(method="haq", act_scheme="tensor", search_tokens=256)
    report = quantize(model, cfg, calib_ids, progress=False)
    out = save_checkpoint(model, _tokenizer(), cfg, report, tmp_path / "ckpt")
    return model, out


def test_round_trip_gives_identical_logits(saved, test_ids):
    model, out = saved
    loaded, tok, manifest = load_checkpoint(out)
    with torch.no_grad():
        assert torch.equal(model(test_ids).logits, loaded(test_ids).logits)
    assert manifest.method["method"] == "haq"
    assert all(len(f.sha256) == 64 for f in manifest.files.values())
    qweights = [k for k, v in manifest.tensors.items() if k.endswith("qweight")]
    assert qweights and all(manifest.tensors[k].dtype == "int8" for k in qweights)
    assert QuantConfig.from_dict(manifest.method) == QuantConfig(method="haq", act_scheme="tensor", search_tokens=256)


def test_corrupt_weights_are_refused_naming_the_file(saved):
    _, out = saved
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.*checksum"):
        load_checkpoint(out)


def test_missing_file_and_bad_manifest_are_refused(saved):
    _, out = saved
    manifest = json.loads((out / MANIFEST).read_text())
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors.*missing"):
        load_checkpoint(out)
    manifest["format_version"] = 99
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="re-run edgeweave quantize"):
        load_checkpoint(out)


def test_tensor_that_does_not_match_manifest_is_refused(saved):
    _, out = saved
    manifest = json.loads((out / MANIFEST).read_text())
    name = next(k for k in manifest["tensors"] if k.endswith("qweight"))
    manifest["tensors"][name]["shape"][0] += 1
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(out)


def test_a_worker_verifies_only_its_layers_files_and_refuses_a_corrupt_one(tmp_path):
    from quant.manifest import ShardRange
    from workers.shard import load_shard

    out = tiny_checkpoint(tmp_path / "ck", layers=3)
    f = out / "layers" / "00002.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    shard = load_shard(out, ShardRange(0, 2, True, False), 64)  # layers 0-1 do not read layer 2's file
    assert shard.stage.last == 2
    with pytest.raises(CheckpointError, match="layers/00002.safetensors.*checksum"):
        load_shard(out, ShardRange(2, 3, False, True), 64)


def test_manifest_tensor_files_must_stay_inside_the_checkpoint(tmp_path):
    out = tiny_checkpoint(tmp_path / "ck", layers=1)
    manifest = json.loads((out / MANIFEST).read_text())
    name = next(iter(manifest["tensors"]))
    manifest["tensors"][name]["file"] = "../../etc/passwd.safetensors"
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="inside the checkpoint"):
        read_manifest(out)
