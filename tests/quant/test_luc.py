"""LUC: the knapsack picks the cheapest policy that fits, sensitivity is measured per layer, the
checkpoint stays within the byte budget, records its policy, and the planner sees its real sizes."""

import pytest
import torch

from quant.config import QuantConfig
from quant.luc import allocate, linear_bytes
from tests.conftest import VOCAB, lean_matches_transformers, tiny_model, tiny_tokenizer


def test_allocate_is_optimal_within_budget():
    import itertools
    costs = [[0.0, 1.0, 5.0], [0.0, 0.2, 0.3], [0.0, 3.0, 9.0]]
    sizes = [[100, 60, 40], [100, 60, 40], [100, 60, 40]]
    for budget in (120, 180, 200, 220, 260, 300):
        picks = allocate(costs, sizes, budget)
        assert sum(sizes[i][o] for i, o in enumerate(picks)) <= budget
        best = min((sum(costs[i][o] for i, o in enumerate(p)), p) for p in itertools.product(range(3), repeat=3)
                   if sum(sizes[i][o] for i, o in enumerate(p)) <= budget)
        assert sum(costs[i][o] for i, o in enumerate(picks)) == pytest.approx(best[0])
    with pytest.raises(ValueError, match="raise it by 20"):
        allocate(costs, sizes, 100)


def test_linear_bytes_match_what_is_stored():
    from quant.qlinear import QuantLinear
    g = torch.Generator().manual_seed(0)
    for bits, sp, group in [(8, 0.0, 0), (4, 0.0, 16), (8, 0.5, 0), (4, 0.5, 16)]:
        q = torch.randint(-7, 8, (32, 64), dtype=torch.int8, generator=g)
        q[:, ::2] = 0  # half pruned
        scale = torch.ones(32, 4) if group else torch.ones(32)
        m = QuantLinear.from_quantized(q, scale, None, "tensor", 0.1, w_bits=bits, w_group=group, sparse=sp > 0)
        stored = sum(t.numel() * t.element_size() for t in m.state_dict().values())
        assert stored <= linear_bytes(32, 64, bits, sp, group, static=True)
        assert stored >= 0.9 * linear_bytes(32, 64, bits, sp, group, static=True)


def _luc(tmp_path, **budget):
    from quant.checkpoint import save_checkpoint
    from quant.pipeline import quantize

    model = tiny_model("llama", layers=3, init_range=0.2)
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    cfg = QuantConfig(method="luc", act_scheme="token", w_group=16, search_tokens=128, luc_eval_windows=2, **budget)
    report = quantize(model, cfg, calib, progress=False)
    return model, save_checkpoint(model, tiny_tokenizer(), cfg, report, tmp_path / "luc"), report


def test_luc_checkpoint_fits_the_budget_and_records_its_policy(tmp_path):
    from quant.checkpoint import load_checkpoint, read_manifest
    from quant.manifest import ShardRange, shard_weight_bytes

    target = 125_000  # the decoder's budget holds two W8 layers and one W4, not three W8
    model, out, report = _luc(tmp_path, target_bytes=target)
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))  # a file per layer + the head's
    manifest = read_manifest(out)
    policy = manifest.method["layer_policy"]
    info = manifest.choices["luc"]
    assert len(policy) == 3 and len(info["sensitivity"]) == 3 and len(info["sensitivity"][0]) == 4
    sens = torch.tensor(info["sensitivity"])  # [layer, option]: options (8, 0), (8, .5), (4, 0), (4, .5)
    assert sens[:, 0].mean() < sens[:, 2].mean() and sens[:, 0].mean() < sens[:, 1].mean()  # W8 dense hurts least
    tensor_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert tensor_bytes <= target and size < target + 10_000  # within the budget (each file adds a JSON header)
    assert target - info["budget"] + info["predicted"] - 16 <= tensor_bytes <= target  # the size model is exact
    assert len({tuple(p) for p in policy}) > 1  # a mixed policy at this budget
    assert (sens >= 0).all()  # KL costs: compressing a layer never scores as an improvement
    # the planner counts what each layer takes in memory: sparse layers decode to dense
    per_layer = [shard_weight_bytes(manifest, ShardRange(i, i + 1, False, False)) for i in range(3)]
    dense_w = {8: 1.0, 4: 0.5}
    weights = 64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 2 + 64 * 128  # q, o; k, v; gate, up; down
    for (bits, _), b in zip(policy, per_layer):
        assert b >= dense_w[bits] * weights  # resident: dense codes, even when the file holds them sparse
    loaded, _, _ = load_checkpoint(out)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    assert lean_matches_transformers(loaded, 6)


def test_luc_avg_sparsity_and_budget_errors(tmp_path):
    from quant.checkpoint import read_manifest
    _, out, _ = _luc(tmp_path, avg_sparsity=0.25, w_bits=8)
    m = read_manifest(out)
    policy = m.method["layer_policy"]
    assert all(b == 8 for b, _ in policy)
    assert sum(sp for _, sp in policy) / 3 >= 0.25 - 1e-9  # equal-size layers: the mean is the budget
    with pytest.raises(ValueError, match="exactly one budget"):
        QuantConfig(method="luc", target_bytes=1, target_ratio=0.5)
    with pytest.raises(ValueError, match="raise it by"):
        _luc(tmp_path, target_ratio=0.1)


def test_luc_options_may_name_their_own_weight_group(tmp_path):
    """An option (4, 0.0, 16) is W4 with one scale per 16 columns, (4, 0.0, 0) one per output channel: at a
    budget that holds two finer-grouped layers, the policy mixes them, each layer is stored with its own
    group, and the checkpoint loads back to the same model."""
    from quant.checkpoint import load_checkpoint, read_manifest
    from quant.qlinear import QuantLinear

    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]  # q k v o gate up down
    per_layer = {g: sum(linear_bytes(n, k, 4, 0.0, g) for n, k in shapes) for g in (0, 16)}
    w8 = 3 * sum(linear_bytes(n, k, 8, 0.0, 0) for n, k in shapes)
    budget = 2 * per_layer[16] + per_layer[0] + (per_layer[16] - per_layer[0]) // 2  # not 3 x 16: half a step short
    options = ((4, 0.0, 0), (4, 0.0, 16))
    model, out, _ = _luc(tmp_path, target_ratio=budget / w8, luc_options=options)
    policy = [tuple(p) for p in read_manifest(out).method["layer_policy"]]
    assert sorted(policy) == [(4, 0.0, 0), (4, 0.0, 16), (4, 0.0, 16)], policy
    for i, (_, _, group) in enumerate(policy):
        linears = [m for m in model.model.layers[i].modules() if isinstance(m, QuantLinear)]
        assert {m.group_size for m in linears} == {group}
    loaded, _, _ = load_checkpoint(out)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    with pytest.raises(ValueError, match="luc options"):
        QuantConfig(method="luc", target_ratio=0.5, luc_options=((8, 0.0, 16),))  # a group belongs to W4 options
