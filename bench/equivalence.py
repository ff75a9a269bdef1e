"""Digests of what every quantization method produces on a tiny seeded model, one line per config.

A refactor that must not change any checkpoint runs this in the tree before and after and compares:

    (cd OLD_TREE && python bench/equivalence.py) > before.txt
    python bench/equivalence.py > after.txt && diff before.txt after.txt

Each line: config name, sha256 of the quantized state dict (names and bytes), the choices recorded.
With --plans CHECKPOINT, one more line: a digest of the placements (or refusals) the planner gives
for 60 seeded random node sets on that checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not bench/
from quant.config import QuantConfig  # noqa: E402
from quant.pipeline import quantize  # noqa: E402
from tests.conftest import VOCAB, tiny_model  # noqa: E402

CONFIGS = {
    "rtn-token": dict(method="rtn"),
    "haq-token": dict(method="haq"),
    "haq-tensor": dict(method="haq", act_scheme="tensor"),
    "tender": dict(method="tender", act_scheme="tender"),
    "haq-w4a-rot": dict(method="haq", w_bits=4, w_group=16, w_asym=True, rotate_down=True),
    "haq-seq-tensor": dict(method="haq", gptq_sequential=True, act_scheme="tensor"),
    "luc": dict(method="luc", target_ratio=0.6, luc_eval_windows=2),
    "mobilequant": dict(method="mobilequant", act_scheme="tensor", mq_epochs=1),
    "rtn-rotres-kd": dict(method="rtn", rotate_residual=True, kd_steps=2),
    "mixtral-haq-tensor": dict(method="haq", act_scheme="tensor"),
}


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        if v.numel():
            h.update(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def plans_digest(checkpoint: str, n: int = 60) -> str:
    """sha256 of the planner's answers for n seeded random node sets (placements as dicts, refusals as text)."""
    from orchestrator.planner import PlacementError, PlanOptions, plan
    from quant.checkpoint import read_manifest
    try:
        from workers.profile import NodeProfile
    except ImportError:  # a tree from before the redesign (ed41308 and older)
        from orchestrator.profile import NodeProfile  # type: ignore[no-redef]

    m = read_manifest(checkpoint)
    rng = random.Random(0)
    out: list = []
    for _ in range(n):
        profiles = [NodeProfile(f"n{j}{rng.randint(0, 999)}", "cpu", rng.randint(80, 400) * 10**6, rng.uniform(1, 6))
                    for j in range(rng.randint(1, 4))]
        try:
            out.append(plan(m, profiles, PlanOptions(context=rng.choice([256, 1024]), batch=rng.choice([1, 8])),
                            model="m").to_dict())
        except PlacementError as e:
            out.append(str(e))
    return hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plans", default=None, metavar="CHECKPOINT", help="also digest the planner's answers")
    a = ap.parse_args()
    calib = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(1))
    for name, kw in CONFIGS.items():
        model = tiny_model("mixtral" if name.startswith("mixtral") else "llama", 0, 2, 0.2)
        report = quantize(model, QuantConfig(search_tokens=256, **kw), calib, progress=False)
        print(name, digest(model), ",".join(sorted(report.choices)))
    if a.plans:
        print("plans", plans_digest(a.plans))


if __name__ == "__main__":
    main()
