"""Online Hadamard rotation of a linear's input (QuaRot-style; pure math, no hooks).

y = W x = (W H)(H x) for an orthogonal, symmetric H. Rotating the input spreads a token's few
massive channels over a whole block of channels, so a per-token (or static) int8 scale no longer
spends its range on one value; the weights are stored rotated (W H) and the kernel rotates each
activation row before quantizing it. H is block-diagonal: K / block normalized Walsh-Hadamard
blocks (Sylvester order), `block` a power of two, applied in O(K log block) adds per row.
quant/csrc/llama_stage.c does the same butterflies in the same order, so both agree bit for bit.
"""

from __future__ import annotations

import torch

__all__ = ["hadamard_block", "hadamard"]

MAX_BLOCK = 2048


def hadamard_block(k: int) -> int:
    """The block for a K-wide input: the largest power of two dividing K, at most MAX_BLOCK
    (SmolLM2's 1536-wide down_proj input: 512); 0 when K is odd (no rotation)."""
    b = min(k & -k, MAX_BLOCK)
    return b if b >= 2 else 0


def hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., K] float -> x H [..., K], H = diag(H_block / sqrt(block), ...). H is its own inverse,
    so it also maps rotated weights back: hadamard(hadamard(w, b), b) == w (to rounding)."""
    k = x.shape[-1]
    if block < 2 or block & (block - 1) or k % block:
        raise ValueError(f"Hadamard block must be a power of two >= 2 dividing {k}, got {block}")
    y = x.reshape(-1, k // block, block)  # [M, B, block]
    h = 1
    while h < block:  # butterflies: (x[j], x[j + h]) -> (x[j] + x[j + h], x[j] - x[j + h])
        y = y.reshape(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=3)
        h *= 2
    return y.reshape(x.shape) * (1.0 / block ** 0.5)
