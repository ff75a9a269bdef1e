"""The real path, small: SmolLM2-135M from the installed package, HAQ W8A8, a few hundred tokens."""

import pytest
import torch

from quant.calibration import SHARED_DATA, read_text
from quant.config import CalibConfig, QuantConfig
from quant.evaluate import perplexity, tokenize_for_eval
from quant.generate import SamplingConfig
from workers.decode import stream_text
from quant.models import load_float_model
from quant.pipeline import quantize

WIKI = SHARED_DATA / "wikitext2" / "test.txt"


@pytest.mark.skipif(not WIKI.is_file(), reason="needs ../shared/data beside the checkout")
def test_smollm2_haq_w8a8_stays_within_a_few_percent_of_float():
    model, tok = load_float_model("smollm2-135m")
    text = read_text(WIKI, max_chars=6000)
    ids = tokenize_for_eval(tok, text)[:1024]  # [T]
    fp = perplexity(model, ids, ctx=256, windows=3, progress=False)
    assert 5 < fp.ppl < 80  # a real pretrained model, not random weights

    calib_text = tok(read_text(SHARED_DATA / "c4" / "validation_2k.jsonl", max_chars=60000))["input_ids"]
    calib = torch.tensor(calib_text[: 8 * 128]).view(8, 128)
    quantize(model, QuantConfig(method="haq", search_tokens=512, calib=CalibConfig(samples=8, seq_len=128)),
             calib, progress=False)
    q = perplexity(model, ids, ctx=256, windows=3, progress=False)
    assert q.ppl / fp.ppl < 1.06, (fp.ppl, q.ppl)

    reply = "".join(stream_text(model, tok, "The capital of France is", SamplingConfig(max_new_tokens=8)))
    assert "Paris" in reply
