from quant.calibration import EVAL_HEAD_CHARS, calibration_windows
from quant.config import CalibConfig


def _chars(text: str, return_tensors=None) -> dict:
    """A character-level tokenizer: one token per character, its code point."""
    return {"input_ids": [ord(c) for c in text]}


def test_windows_never_read_the_head_the_evaluation_scores(tmp_path):
    # the evaluation protocol scores a file's first windows; a calibration asking for more text than
    # the file holds must still draw none of its windows from there
    p = tmp_path / "calib.txt"
    p.write_text("a" * EVAL_HEAD_CHARS + "b" * EVAL_HEAD_CHARS * 2)
    ids = calibration_windows(_chars, CalibConfig(path=str(p), samples=400, seq_len=512))  # wants 2.4 M chars
    assert ids.shape == (400, 512)
    assert bool((ids == ord("b")).all())


def test_short_text_is_used_whole(tmp_path):
    # a file shorter than twice the reserved head keeps no head back: it would leave too little
    p = tmp_path / "calib.txt"
    p.write_text("".join(chr(ord("a") + i % 26) for i in range(3000)))
    ids = calibration_windows(_chars, CalibConfig(path=str(p), samples=32, seq_len=64, seed=1))
    assert ids.shape == (32, 64)
    assert int(ids[:, 0].min()) >= ord("a") and bool(((ids[:, 1:] - ids[:, :-1]) % 26 == 1).all())
