"""An orthogonal rotation of the residual stream, folded into the weights (QuaRot's and SpinQuant's R1;
pure math on a float model, nothing at run time).

For an orthogonal Q [D, D] the float model computes the same function when its residual stream h is
carried as h Q instead of h:
- an RMSNorm keeps no per-channel weight: its weight g is first folded into the columns of every
  linear reading its output (W -> W diag(g)), leaving a plain RMSNorm, which commutes with Q since
  rms(h Q) = rms(h);
- every linear reading the residual (q/k/v, gate/up, the MoE router and experts' gate_up, lm_head)
  takes W -> W Q, and every linear writing to it (o, down, each expert's down) takes W -> Q^T W;
- the embedding rows take E -> E Q.
A rotated residual has no channel that carries a token's few massive values, and the rotated
weights have no outlier columns, which is what 4-bit weight rounding and 8-bit activations both
gain from. lm_head absorbs the final norm's weight, so a model with tied embeddings is untied
(embedding E Q, lm_head E diag(g) Q): the checkpoint holds both.

Only RMSNorm architectures (llama, mistral, mixtral): LayerNorm's mean removal does not commute with
a rotation until the model is rewritten around it, which OPT's is not.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .arch import arch_spec

__all__ = ["random_orthogonal", "rotate_residual", "ROTATABLE"]

ROTATABLE = ("llama", "mistral", "mixtral")


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal [d, d] float64 matrix: QR of a seeded Gaussian, signs fixed so the
    distribution is uniform (Mezzadri 2007)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


def _reads(w: torch.Tensor, g: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A reader of the normed residual: W [N, D] -> W diag(g) Q, in float64, back to W's dtype."""
    return ((w.double() * g.double()[None, :]) @ q).to(w.dtype)


def _writes(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A writer to the residual: W [D, K] -> Q^T W."""
    return (q.t() @ w.double()).to(w.dtype)


@torch.no_grad()
def rotate_residual(model: Any, seed: int = 0) -> torch.Tensor:
    """Rotates a transformers CausalLM's residual stream in place (the function it computes is
    unchanged, to float rounding) -> Q [D, D] float64. Raises ValueError for other architectures."""
    spec = arch_spec(model)
    if spec.model_type not in ROTATABLE:
        raise ValueError(f"rotating the residual stream needs RMSNorm layers ({', '.join(ROTATABLE)}), "
                         f"not {spec.model_type}")
    emb = model.get_submodule(spec.embed_path)
    head = model.get_output_embeddings()
    d = emb.weight.shape[1]
    q = random_orthogonal(d, seed)
    head_w = head.weight.data.clone()  # before the embedding is rotated: they may be one tensor
    emb.weight = nn.Parameter(emb.weight.data.double().matmul(q).to(emb.weight.dtype))  # E Q, a tensor of its own

    def fold_norm(norm: Any) -> torch.Tensor:
        if getattr(norm, "bias", None) is not None:
            raise ValueError(f"{type(norm).__name__} has a bias: only RMSNorm can be folded")
        g = norm.weight.data.clone()
        norm.weight.data.fill_(1.0)
        return g

    for layer in model.get_submodule(spec.layers_path):
        g = fold_norm(layer.input_layernorm)
        attn = layer.self_attn
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.weight.data = _reads(lin.weight.data, g, q)
        attn.o_proj.weight.data = _writes(attn.o_proj.weight.data, q)
        if attn.o_proj.bias is not None:
            attn.o_proj.bias.data = _writes(attn.o_proj.bias.data[:, None], q)[:, 0]
        g = fold_norm(layer.post_attention_layernorm)
        mlp = layer.mlp
        if spec.model_type == "mixtral":  # router and expert banks: gate_up [E, 2I, D], down [E, D, I]
            mlp.gate.weight.data = _reads(mlp.gate.weight.data, g, q)
            bank = mlp.experts
            bank.gate_up_proj.data = torch.stack([_reads(w, g, q) for w in bank.gate_up_proj.data])
            bank.down_proj.data = torch.stack([_writes(w, q) for w in bank.down_proj.data])
        else:
            for lin in (mlp.gate_proj, mlp.up_proj):
                lin.weight.data = _reads(lin.weight.data, g, q)
            mlp.down_proj.weight.data = _writes(mlp.down_proj.weight.data, q)
            if mlp.down_proj.bias is not None:
                mlp.down_proj.bias.data = _writes(mlp.down_proj.bias.data[:, None], q)[:, 0]
    g = fold_norm(model.get_submodule(spec.final_norm_path))
    head.weight = nn.Parameter(_reads(head_w, g, q))  # untied from the embedding
    model.config.tie_word_embeddings = False
    return q
