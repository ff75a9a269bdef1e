import torch

from quant.smoothing import search_smoothing, smoothing_scales, tie_kv_scales


def test_smoothing_is_an_exact_float_transform():
    x = torch.randn(32, 16)
    w = torch.randn(8, 16)
    s = smoothing_scales(x.abs().amax(0), w.abs().amax(0), 0.8)
    assert torch.allclose((x / s) @ (w * s).t(), x @ w.t(), atol=1e-4)


def test_search_picks_smoothing_when_activations_have_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 64, generator=g)
    x[:, 3] *= 60  # the outlier channels real LLMs have
    x[:, 40] *= 30
    w = torch.randn(32, 64, generator=g) * 0.05
    choice = search_smoothing(x, x.abs().amax(0), w, (0.5, 0.8), (1.0, 0.8), per_token=False)
    none = search_smoothing(x, x.abs().amax(0), w, (), (1.0, 0.8), per_token=False, allow_smoothing=False)
    assert choice.alpha is not None
    assert choice.error < 0.5 * none.error


def test_kv_tied_scales_are_equal_across_heads_of_one_kv_head():
    s = torch.rand(4 * 8) + 0.5  # 4 heads of dim 8, 2 kv heads
    t = tie_kv_scales(s, heads_per_kv=2, head_dim=8).view(2, 2, 8)
    assert torch.equal(t[:, 0], t[:, 1])
    assert torch.all(t.reshape(-1) >= s)
