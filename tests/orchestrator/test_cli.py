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
