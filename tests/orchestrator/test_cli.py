"""The command line as a user meets it: real subprocesses for the error paths users hit first."""

import json
import subprocess
import sys

import pytest

from orchestrator.cli import main
from quant.checkpoint import save_checkpoint
from quant.config import QuantConfig
from quant.pipeline import quantize
from tests.conftest import tiny_model
from tests.quant.test_checkpoint import _tokenizer


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True, timeout=300)


def test_missing_model_says_what_to_pass():
    r = run_cli("eval", "/nonexistent/model", "--windows", "1")
    assert r.returncode == 2
    assert "no model at '/nonexistent/model'" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture
def ckpt(tmp_path, calib_ids):
    model = tiny_model("llama")
    cfg = QuantConfig(method="rtn")
    report = quantize(model, cfg, calib_ids, progress=False)
    return save_checkpoint(model, _tokenizer(), cfg, report, tmp_path / "ck")


def test_eval_on_checkpoint_writes_json(ckpt, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"t{i % 200}" for i in range(700)))
    out = tmp_path / "r.json"
    assert main(["eval", str(ckpt), "--text", str(text), "--ctx", "64", "--windows", "3", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["windows"] == 3 and res["ctx"] == 64 and res["tokens"] == 3 * 63 and res["ppl"] > 1


def test_windows_larger_than_text_is_a_clear_error(ckpt, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"t{i % 200}" for i in range(100)))
    assert main(["eval", str(ckpt), "--text", str(text), "--ctx", "64", "--windows", "5"]) == 2
    assert "only 1" in capsys.readouterr().err


def test_unreadable_text_is_a_clear_error(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00garbage\xc3")
    assert main(["eval", str(ckpt), "--text", str(bad)]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "--text", str(tmp_path / "absent.txt")]) == 2
    assert "text file not found" in capsys.readouterr().err


def test_generate_streams_from_checkpoint(ckpt, capsys):
    assert main(["generate", str(ckpt), "t5 t6 t7", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("t5 t6 t7") and len(out.split()) > 3


def test_plan_prints_a_table_and_refuses_with_missing_bytes(tmp_path):
    from tests.conftest import tiny_checkpoint

    ck = tiny_checkpoint(tmp_path / "ck", layers=4)
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps([{"node_id": "edge-a", "budget_bytes": "2MB", "int8_gops": 2.0},
                                 {"node_id": "edge-b", "tier": "slow-cpu", "budget_bytes": "1MB", "int8_gops": 0.5}]))
    r = run_cli("plan", str(ck), "--nodes", str(nodes), "--context", "128", "--batch", "2", "--json", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    assert "edge-a" in r.stdout and "bytes used / budget" in r.stdout and "est ms/token" in r.stdout
    assert json.loads((tmp_path / "p.json").read_text())["stages"][0]["node_id"] == "edge-a"
    nodes.write_text(json.dumps([{"node_id": "tiny", "budget_bytes": "100KB"}]))
    r = run_cli("plan", str(ck), "--nodes", str(nodes))
    assert r.returncode == 2 and "bytes are missing" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("plan", str(tmp_path), "--nodes", str(nodes))
    assert r.returncode == 2 and "not a quantized checkpoint" in r.stderr


def test_generate_from_an_unreachable_server_fails_cleanly():
    r = run_cli("generate", "--server", "127.0.0.1:9", "hello", "--timeout", "3")
    assert r.returncode == 2 and "server 127.0.0.1:9: UNAVAILABLE" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("method,extra", [("luc", ["--target-ratio", "0.6", "--w-asym"]), ("mobilequant", ["--epochs", "1"]),
                                          ("haq", ["--w-bits", "4", "--w-group", "16", "--w-asym", "--rotate-down"])])
def test_quantize_luc_mobilequant_and_w4_from_the_command_line(tmp_path, capsys, method, extra):
    """A user's model directory in, a servable checkpoint out; plan reads its real per-layer sizes."""
    import random

    from quant.checkpoint import read_manifest
    from quant.manifest import ShardRange, shard_weight_bytes

    src = tmp_path / "model"
    tiny_model("llama", layers=2, init_range=0.2).save_pretrained(src)
    _tokenizer().save_pretrained(src)
    rng = random.Random(0)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"t{rng.randrange(2, 256)}" for _ in range(2000)))
    out = tmp_path / method
    assert main(["quantize", str(src), "--method", method, *extra, "--calib", str(text), "--calib-samples", "4",
                 "--calib-len", "32", "--out", str(out)]) == 0
    m = read_manifest(out)
    assert m.method["method"] == method
    if method == "luc":
        assert len(m.method["layer_policy"]) == 2 and m.choices["luc"]["predicted"] <= m.choices["luc"]["budget"]
        assert m.method["w_asym"] and m.choices["luc"]["cost"] == "kl"
    elif method == "haq":
        assert m.tensors["model.layers.0.mlp.down_proj.w_zero"].shape == (64, 128 // 16)
        assert m.modules["model.layers.0.mlp.down_proj"]["w_zero"]
        # --rotate-down: rotation (one block of I = 128) competed with smoothing; the module holds the choice
        assert m.modules["model.layers.0.mlp.down_proj"]["rotate"] == m.choices["layers.0.down"]["rotate"]
        assert m.choices["layers.0.down"]["rotate"] in (0, 128) and "mse_unrotated" in m.choices["layers.0.down"]
        assert m.modules["model.layers.0.mlp.up_proj"]["rotate"] == 0 and m.method["rotate_down"]
    else:
        assert m.method["act_scheme"] == "tensor" and "model.layers.0.self_attn.q_proj.input_offset" in m.tensors
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps([{"node_id": "a", "budget_bytes": "4MB", "int8_gops": 2.0}]))
    assert main(["plan", str(out), "--nodes", str(nodes), "--context", "64", "--json", str(tmp_path / "p.json")]) == 0
    stage = json.loads((tmp_path / "p.json").read_text())["stages"][0]
    assert stage["weight_bytes"] == shard_weight_bytes(m, ShardRange(0, 2, True, True))


def test_tune_then_eval_with_voting(tmp_path, capsys):
    import random

    from quant.checkpoint import read_manifest
    from tests.conftest import tiny_checkpoint

    ck = tiny_checkpoint(tmp_path / "ck", layers=2, init_range=0.2)
    rng = random.Random(1)
    text = tmp_path / "mine.txt"
    text.write_text(" ".join(f"t{rng.choice([5, 6, 7, 8, 9, 10])}" for _ in range(3000)))  # a narrow "domain"
    out = tmp_path / "tuned"
    assert main(["tune", str(ck), "--text", str(text), "--out", str(out), "--window", "1", "--steps", "10",
                 "--lr", "0.03", "--samples", "8", "--seq-len", "32", "--held-out", "2"]) == 0
    line = capsys.readouterr().out
    assert "held-out loss" in line and "MiB per window" in line
    t = read_manifest(out).choices["tune"]
    assert t["loss_after"] < t["loss_before"] and t["peak_window_bytes"] < t["full_model_bytes"]
    assert main(["eval", str(out), "--text", str(text), "--ctx", "64", "--windows", "2", "--vote-exits", "1,2"]) == 0
    assert "voting over exits (1, 2)" in capsys.readouterr().out
    assert main(["tune", str(tmp_path), "--text", str(text), "--out", str(tmp_path / "x")]) == 2


def test_haq_rotates_down_proj_by_default_and_the_flag_turns_it_off():
    from orchestrator.cli import build_parser, quant_config

    def cfg(*args):
        return quant_config(build_parser().parse_args(["quantize", "smollm2-135m", "--out", "x", *args]))

    assert cfg("--method", "haq").rotate_down and not cfg("--method", "haq", "--no-rotate-down").rotate_down
    assert not cfg("--method", "rtn").rotate_down and cfg("--method", "rtn", "--rotate-down").rotate_down
    assert not cfg("--method", "tender").rotate_down
    with pytest.raises(SystemExit, match="--rotate-down and --rotate-all work with rtn and haq"):
        cfg("--method", "tender", "--rotate-down")


def test_refit_scales_flag_reaches_the_config_and_is_refused_where_there_is_no_gptq():
    from orchestrator.cli import build_parser, quant_config

    def cfg(*args):
        return quant_config(build_parser().parse_args(["quantize", "smollm2-135m", "--out", "x", *args]))

    assert cfg("--method", "haq").gptq_refit == 0
    assert cfg("--method", "haq", "--w-bits", "4", "--refit-scales", "2").gptq_refit == 2
    with pytest.raises(SystemExit, match="--refit-scales refits GPTQ's scales"):
        cfg("--method", "rtn", "--refit-scales", "1")


def test_kd_steps_flag_reaches_the_config_and_is_refused_for_methods_it_cannot_run():
    from orchestrator.cli import build_parser, quant_config

    def cfg(*args):
        return quant_config(build_parser().parse_args(["quantize", "smollm2-135m", "--out", "x", *args]))

    assert cfg("--method", "haq").kd_steps == 0
    c = cfg("--method", "haq", "--w-bits", "4", "--kd-steps", "64", "--kd-lr", "0.001")
    assert (c.kd_steps, c.kd_lr) == (64, 0.001)
    with pytest.raises(SystemExit, match="--kd-steps distills the weight scales of rtn, haq and luc"):
        cfg("--method", "tender", "--kd-steps", "8")


def test_luc_options_parse_bits_sparsity_and_an_optional_group():
    from orchestrator.cli import _luc_options

    assert _luc_options("8,8:0.5,4,4:0:128") == ((8, 0.0), (8, 0.5), (4, 0.0), (4, 0.0, 128))
    with pytest.raises(SystemExit, match="BITS:SPARSITY:GROUP"):
        _luc_options("4:half")


def test_serve_flags_for_keep_awake_and_pool_reach_the_options(ckpt):
    from orchestrator.cli import _serve_options, build_parser

    a = build_parser().parse_args(["serve", str(ckpt)])
    opts = _serve_options(a)
    assert opts.keep_awake and opts.pool == ""  # defaults: cores kept awake while steps arrive, every node
    a = build_parser().parse_args(["serve", str(ckpt), "--no-keep-awake", "--pool", "edge-a"])
    opts = _serve_options(a)
    assert not opts.keep_awake and opts.pool == "edge-a"
