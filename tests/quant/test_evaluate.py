"""Evaluation metrics LUC's policy and the benchmarks rely on."""

import torch
import torch.nn.functional as F

from quant.evaluate import mean_window_kl, mean_window_loss, window_log_probs
from tests.conftest import VOCAB, tiny_model


def test_kl_is_zero_for_the_reference_and_grows_with_the_damage():
    model = tiny_model("llama", layers=2, init_range=0.2)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = window_log_probs(model, ids)
    assert len(ref) == 2 and ref[0].shape == (24, VOCAB)
    assert abs(mean_window_kl(model, ids, ref)) < 1e-6
    down = model.model.layers[0].mlp.down_proj.weight
    w0 = down.data.clone()
    kls = []
    for noise in (0.01, 0.1):
        down.data = w0 + noise * torch.randn(w0.shape, generator=torch.Generator().manual_seed(1))
        kls.append(mean_window_kl(model, ids, ref))
    assert 0 < kls[0] < kls[1]
    # the same quantity computed directly for the last setting
    with torch.no_grad():
        q = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
    direct = sum((r.exp() * (r - qi)).sum(-1).mean() for r, qi in zip(ref, q)) / 2
    assert abs(kls[1] - float(direct)) < 1e-4
    assert mean_window_loss(model, ids) > 0
