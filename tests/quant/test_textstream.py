from quant.textstream import TextStreamer
from tests.conftest import tiny_tokenizer


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_pieces_concatenate_to_the_decoded_text():
    tok = tiny_tokenizer()
    s = TextStreamer(tok)
    ids = _ids(tok, "t5 t6 t7 t8")
    out = "".join(s.push(i) for i in ids) + s.finish()
    assert out == tok.decode(ids)


def test_stop_string_ends_the_stream_and_is_not_emitted():
    tok = tiny_tokenizer()
    s = TextStreamer(tok, ("t7",))
    out = ""
    for i in _ids(tok, "t5 t6 t7 t8"):
        out += s.push(i)
        if s.stopped:
            break
    assert s.stopped and out == "t5 t6 " and s.finish() == ""


def test_text_that_may_start_a_stop_string_is_held_back():
    tok = tiny_tokenizer()
    s = TextStreamer(tok, ("t6 t9",))
    assert s.push(_ids(tok, "t5")[0]) == "t5"
    held = s.push(_ids(tok, "t6")[0])  # " t6" could begin "t6 t9"
    assert "t6" not in held and not s.stopped
    rest = s.push(_ids(tok, "t8")[0])  # it did not
    assert "t6 t8" in held + rest and not s.stopped
