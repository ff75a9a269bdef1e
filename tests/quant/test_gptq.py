import torch

from quant.gptq import gptq_quantize
from quant.kernels import quantize_weight_per_channel


def _correlated_inputs(t: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(t, k // 4, generator=g)
    return base.repeat_interleave(4, dim=1) + 0.1 * torch.randn(t, k, generator=g)  # [T, K]


def test_gptq_output_error_beats_round_to_nearest():
    x = _correlated_inputs(2048, 128)
    w = torch.randn(64, 128) * 0.1
    h = 2 * x.t().double() @ x.double() / x.shape[0]
    q, s = gptq_quantize(w, h, block=32)
    r, rs = quantize_weight_per_channel(w)
    ref = x @ w.t()
    err_gptq = (x @ (q.float() * s[:, None]).t() - ref).pow(2).mean()
    err_rtn = (x @ (r.float() * rs[:, None]).t() - ref).pow(2).mean()
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert err_gptq < 0.7 * err_rtn


def test_gptq_handles_dead_input_channels():
    x = _correlated_inputs(512, 64)
    x[:, 5] = 0  # a channel calibration never activates
    h = 2 * x.t().double() @ x.double() / x.shape[0]
    q, _ = gptq_quantize(torch.randn(8, 64), h)
    assert int(q[:, 5].abs().max()) == 0
