"""The one place deciding what is resident: prefetch scores, eviction on a miss, hysteresis."""

import numpy as np

from workers.residency import PathStats, StatsWeights, admit_on_miss, choose_resident, prefetch_scores


def test_a_miss_evicts_the_lowest_scored_resident():
    scores = np.array([0.0, -5.0, -1.0, -0.5])
    assert admit_on_miss({0, 1, 2}, 3, 3, scores) == [3, 0, 2]  # 1 scores lowest: it leaves
    assert admit_on_miss({0, 1, 2}, 3, 3) == [3, 0, 1]  # no scores yet: the highest-numbered leaves
    assert admit_on_miss({0}, 3, 3, scores) == [3, 0]  # room left: nobody leaves
    assert admit_on_miss({0, 3}, 3, 2, scores) == [3, 0]  # already resident


def test_prefetch_scores_take_the_likeliest_row():
    st = PathStats(2, 4)
    st.act[1] = [1, 1, 1, 1]
    st.trans["l1"][1, 0, 2] = 40  # expert 0 at layer 0 -> expert 2 at layer 1
    st.trans["l1"][1, 1, 3] = 40
    s = prefetch_scores(st, StatsWeights(), 1, [[(0,), None], [(1,), None]], [None, None])
    assert s is not None and set(np.argsort(-s)[:2]) == {2, 3}  # each row's prediction counts
    assert (s <= 0).all() and np.exp(s).max() <= 1.0  # log-probabilities
    assert prefetch_scores(st, StatsWeights(), 1, [], []) is None
    new = choose_resident(s, frozenset({0, 1}), 2, StatsWeights().hysteresis)
    assert new == {2, 3}
