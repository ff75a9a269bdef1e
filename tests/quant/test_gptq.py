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


def _hessian_error(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, group: int, h: torch.Tensor) -> torch.Tensor:
    """Per row: (w - w_q)^T H (w - w_q), the row's squared output error on the calibration inputs."""
    e = w.double() - q.double() * s.double().repeat_interleave(group, dim=1)
    return torch.einsum("nk,kl,nl->n", e, h.double(), e)


def test_refit_scales_lowers_the_output_error_row_by_row_and_keeps_the_codes():
    from quant.int4 import search_w4_scale

    x = _correlated_inputs(2048, 256) * torch.linspace(0.2, 3.0, 256)  # uneven channel energy
    w = torch.randn(48, 256) * 0.05
    h = x.t().double() @ x.double()
    scale, zero = search_w4_scale(w, torch.diag(h).float(), (1.0, 0.9, 0.8), 128, True)
    q0, s0 = gptq_quantize(w, h, 4, 128, 0.01, True, scale, 128, 0.0, zero)
    q1, s1 = gptq_quantize(w, h, 4, 128, 0.01, True, scale, 128, 0.0, zero, refit=1)
    q2, s2 = gptq_quantize(w, h, 4, 128, 0.01, True, scale, 128, 0.0, zero, refit=2)
    e0, e1, e2 = (_hessian_error(w, q, s, 128, h) for q, s in ((q0, s0), (q1, s1), (q2, s2)))
    assert torch.equal(q1, q0)  # one round refits the scales to GPTQ's codes; the codes stay
    assert (e1 <= e0 * (1 + 1e-9)).all() and e1.sum() < 0.995 * e0.sum()
    assert e2.sum() < e1.sum()  # rounding again to the refit scales, then refitting, helps further
    assert s1.shape == s0.shape and (s1 > 0).all()
    # the codes stay in the zero-pointed range [-z, 15 - z]
    z = zero.repeat_interleave(128, dim=1).int()
    assert (q2.int() >= -z).all() and (q2.int() <= 15 - z).all()


def test_refit_scales_per_output_channel_at_8_bits():
    x = _correlated_inputs(1024, 64)
    w = torch.randn(16, 64) * 0.1
    h = x.t().double() @ x.double()
    q0, s0 = gptq_quantize(w, h)
    q1, s1 = gptq_quantize(w, h, refit=1)
    assert s1.shape == (16,) and torch.equal(q0, q1)
    e0, e1 = (_hessian_error(w, q0, s[:, None], 64, h) for s in (s0, s1))
    assert (e1 <= e0 * (1 + 1e-9)).all()


def test_wide_inputs_round_in_float32_as_well_and_a_handed_over_hessian_is_released():
    """Past HESSIAN_F64_MAX_K input channels (7B's down projection: 11008) X^T X and GPTQ's work are
    float32 (half the memory); the rounding still beats round-to-nearest on the output error, and a
    Hessian handed over with own_h is emptied, not kept beside its factor."""
    from quant.calibration import HESSIAN_F64_MAX_K, ActStats

    k = HESSIAN_F64_MAX_K + 64
    x = _correlated_inputs(256, k)
    st = ActStats()
    st.add(x)
    assert st.xtx is not None and st.xtx.dtype == torch.float32
    w = torch.randn(16, k) * 0.1
    h = st.take_hessian()
    assert st.xtx is None and h.dtype == torch.float32
    ref = 2 * x.t().double() @ x.double() / x.shape[0]
    q, s = gptq_quantize(w, h, own_h=True)
    assert h.numel() == 0  # its memory went back once its Cholesky factor was had
    r, rs = quantize_weight_per_channel(w)
    assert _hessian_error(w, q, s[:, None], k, ref).mean() < 0.8 * _hessian_error(w, r, rs[:, None], k, ref).mean()
