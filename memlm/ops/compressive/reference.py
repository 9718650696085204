"""Compressive (Infini-attention) memory over segments, token by token: the specification.

Notation (per batch row b and head h; one segment n of C slots, tokens t; R memories per head):
  σ(x) = ELU(x) + 1 > 0 (applied by the caller: inputs are σ(Q), σ(K));  M_r ∈ R^{K×V}, z_r ∈ R^K  memory r
  read   (every token of segment n, from the memories as they stood before the segment):
         num_{t,r} = σ(q_t) M_r,   den_{t,r} = σ(q_t) · z_r          (the caller forms A_mem = num / den)
  write  (once, when the segment is complete, into memory r_n = write_slot[n]):
         linear: M_r += Σ_t σ(k_t)ᵀ v_t
         delta:  M_r += Σ_t σ(k_t)ᵀ (v_t − σ(k_t) M_r / (σ(k_t) · z_r))      (retrieval from the pre-segment memory)
         z_r += Σ_t σ(k_t)
  A segment with starts_doc set first clears every memory (a new document); empty slots carry σ(k) = 0.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["segment_memory"]


def segment_memory(sq: Tensor, sk: Tensor, v: Tensor, *, M0: Tensor, z0: Tensor, write_slot: Tensor,
                   starts_doc: Tensor, complete: Tensor, delta: bool, eps: float = 1e-6
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """sq, sk [B, N, C, H, K] (σ already applied; sk zero on empty slots); v [B, N, C, H, V];
    M0 [B, H, R, K, V]; z0 [B, H, R, K]; write_slot long [B, N]; starts_doc, complete bool [B, N].

    Returns num [B, N, C, H, R, V], den [B, N, C, H, R], z_pre [B, N, H, R, K] (normalisers before each segment),
    and the final M [B, H, R, K, V], z [B, H, R, K], all float32.
    """
    B, N, C = sq.shape[:3]
    sq, sk, v = sq.float(), sk.float(), v.float()
    M, z = M0.float(), z0.float()
    nums, dens, zs = [], [], []
    for n in range(N):
        if starts_doc[:, n].any():
            keep = (~starts_doc[:, n]).float()
            M = M * keep[:, None, None, None, None]
            z = z * keep[:, None, None, None]
        zs.append(z)
        dM = torch.zeros_like(M)
        dz = torch.zeros_like(z)
        rows_num, rows_den = [], []
        for t in range(C):
            q = sq[:, n, t]                                              # [B, H, K]
            rows_num.append(torch.einsum("bhk,bhrkv->bhrv", q, M))
            rows_den.append(torch.einsum("bhk,bhrk->bhr", q, z))
            k, val = sk[:, n, t], v[:, n, t]
            for b in range(B):
                r = int(write_slot[b, n])
                w = val[b]
                if delta:
                    retrieved = torch.einsum("hk,hkv->hv", k[b], M[b, :, r])
                    w = w - retrieved / torch.einsum("hk,hk->h", k[b], z[b, :, r]).clamp_min(eps)[:, None]
                dM[b, :, r] += k[b][:, :, None] * w[:, None, :]
                dz[b, :, r] += k[b]
        nums.append(torch.stack(rows_num, 1))
        dens.append(torch.stack(rows_den, 1))
        c = complete[:, n].float()
        M = M + c[:, None, None, None, None] * dM
        z = z + c[:, None, None, None] * dz
    return torch.stack(nums, 1), torch.stack(dens, 1), torch.stack(zs, 1), M, z
