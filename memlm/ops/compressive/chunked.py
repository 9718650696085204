"""Compressive (Infini-attention) memory, one batched step per segment: the default backend.

Same contract and notation as reference.py; the loop runs over segments only (C tokens at a time), each read is
one einsum against the pre-segment memories and each write one σ(K)ᵀ V product.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["segment_memory"]


def segment_memory(sq: Tensor, sk: Tensor, v: Tensor, *, M0: Tensor, z0: Tensor, write_slot: Tensor,
                   starts_doc: Tensor, complete: Tensor, delta: bool, eps: float = 1e-6
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See reference.segment_memory: sq, sk [B, N, C, H, K]; v [B, N, C, H, V]; M0 [B, H, R, K, V]; z0 [B, H, R, K];
    write_slot [B, N]; starts_doc, complete [B, N] -> num, den, z_pre, M, z (float32)."""
    N, R = sq.shape[1], M0.shape[2]
    sq, sk, v = sq.float(), sk.float(), v.float()
    M, z = M0.float(), z0.float()
    nums, dens, zs = [], [], []
    for n in range(N):
        # where, not a multiply: a new document must cut the old memory off, gradient path included
        fresh = starts_doc[:, n]
        M = torch.where(fresh[:, None, None, None, None], torch.zeros((), device=M.device), M)
        z = torch.where(fresh[:, None, None, None], torch.zeros((), device=z.device), z)
        zs.append(z)
        nums.append(torch.einsum("bchk,bhrkv->bchrv", sq[:, n], M))
        dens.append(torch.einsum("bchk,bhrk->bchr", sq[:, n], z))
        # a comparison, not F.one_hot: one_hot validates its input on the host (a sync that breaks CUDA graphs)
        onehot = (write_slot[:, n, None] == torch.arange(R, device=M.device)).float()   # [B, R]
        k, val = sk[:, n], v[:, n]                                       # [B, C, H, K], [B, C, H, V]
        if delta:
            Mr = torch.einsum("br,bhrkv->bhkv", onehot, M)
            zr = torch.einsum("br,bhrk->bhk", onehot, z)
            retrieved = torch.einsum("bchk,bhkv->bchv", k, Mr)
            norm = torch.einsum("bchk,bhk->bch", k, zr).clamp_min(eps)
            val = val - retrieved / norm[..., None]
        dM = torch.einsum("bchk,bchv->bhkv", k, val)
        dz = k.sum(1)
        c = (complete[:, n].float()[:, None] * onehot)                    # [B, R]: commit into slot r_n
        M = M + c[:, None, :, None, None] * dM[:, :, None]
        z = z + c[:, None, :, None] * dz[:, :, None]
    return torch.stack(nums, 1), torch.stack(dens, 1), torch.stack(zs, 1), M, z
