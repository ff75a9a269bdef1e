"""A session's feed and replay state: prompt chunks, output tokens, the end, and a replay that
re-feeds exactly what was fed and hands out nothing twice."""

import queue

from orchestrator.sessions import GenerationRequest, Session


def _session(prompt=(5, 6, 7, 8, 9), max_tokens=3) -> Session:
    return Session("s", GenerationRequest(tuple(prompt), max_tokens), queue.Queue(), list(prompt))


def test_prompt_in_chunks_then_one_token_per_step_until_length():
    s = _session()
    steps = []
    for token in (50, 51, 52, 53, 54):  # what the stages answer, step by step
        chunk = s.next_chunk(2)
        steps.append((chunk, s.pos, s.advance(chunk, token, {1})))
    assert [c for c, _, _ in steps] == [[5, 6], [7, 8], [9], [52], [53]]
    assert [p for _, p, _ in steps] == [0, 2, 4, 5, 6]
    assert [a.token for _, _, a in steps] == [None, None, 52, 53, 54]  # prompt steps hand out nothing
    assert [a.finish for _, _, a in steps] == ["", "", "", "", "length"]
    assert s.max_tokens == 8 and s.generated == 3


def test_eos_ends_the_session():
    s = _session(prompt=(5,), max_tokens=10)
    assert s.advance(s.next_chunk(4), 1, {1}).finish == "eos"


def test_a_replay_refeeds_every_chunk_and_hands_out_nothing():
    s = _session()
    for token in (50, 51, 52):
        s.advance(s.next_chunk(2), token, {1})
    fed = [list(c) for c in s.fed]
    s.start_replay()
    assert s.pos == 0
    replayed = []
    while s.replay:
        chunk = s.next_chunk(2)
        a = s.advance(chunk, 99, {1})
        assert a.token is None and not a.finish and a.replayed == len(chunk)
        replayed.append(chunk)
    assert replayed == fed and s.pos == 5
    assert s.next_chunk(2) == [52]  # then it goes on where it was, with the token it had handed out
    assert s.advance([52], 60, {1}).token == 60
