"""CLEAR's element mask of a block plan as bits, built once per plan on the plan's device (what the Triton kernels
test instead of recomputing distances per element).

A masked entry pairs query block ``i`` with key block ``j``; query slot ``a`` may attend key slot ``b`` where both
slots hold tokens and either token is text or an extra key (``t < 0``) or ``dy² + dx² <= max_d2`` and
``|dt| <= max_dt``. Row ``m`` of ``bits`` belongs to the ``m``-th masked entry: one int64 word per query slot
whose bit ``b`` is that pair's answer (so a key block holds at most 64 slots). Entries are renumbered as kinds the
kernels read: 0 for a full entry, ``m + 1`` for the entry of row ``m``, in the CSR and in its transpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Bits of one word: the most key slots a block may hold.
MAX_KEY_BLOCK = 64
# Masked entries per step of the build: its (entries, query slots, key slots) int64 temporaries stay at 16 MB each.
_CHUNK = 256


@dataclass(frozen=True)
class DiscBits:
    """``bits (masked entries or 1, max query block)`` int64 (see the module docstring), ``kinds (entries,)`` and
    ``t_kinds (transposed entries,)`` int32, on the plan's device."""

    bits: torch.Tensor
    kinds: torch.Tensor
    t_kinds: torch.Tensor


def _slots(offsets: torch.Tensor, blocks: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layout positions ``(len(blocks), size)`` of the slots of ``blocks`` (clamped to the block's first) and
    whether each holds a token."""
    start = offsets[blocks]
    pos = start[:, None] + torch.arange(size, device=offsets.device)
    held = pos < offsets[blocks + 1][:, None]
    return torch.where(held, pos, start[:, None]), held


def disc_bits(plan) -> DiscBits:
    """The disc bits of ``plan`` (a :class:`.plan.BlockPlan` with ``max_d2 >= 0``)."""
    q_block, k_block = plan.max_blocks
    if k_block > MAX_KEY_BLOCK:
        raise ValueError(f"plan: key blocks of {k_block} slots, the disc bits hold at most {MAX_KEY_BLOCK}")
    device = plan.indices.device
    rows = torch.repeat_interleave(torch.arange(plan.num_query_blocks, device=device), plan.indptr.diff())
    masked = torch.nonzero(plan.kinds != 0).flatten()
    q_coords, k_coords = plan.q_coords.view(-1, 3).long(), plan.k_coords.view(-1, 3).long()
    key_bit = torch.ones(k_block, dtype=torch.int64, device=device) << torch.arange(k_block, device=device)
    words = []
    for chunk in masked.split(_CHUNK):
        q_pos, q_held = _slots(plan.q_offsets, rows[chunk], q_block)
        k_pos, k_held = _slots(plan.k_offsets, plan.indices[chunk], k_block)
        a, b = q_coords[q_pos][:, :, None], k_coords[k_pos][:, None, :]  # (entries, q slots, 1 | k slots, 3)
        d2 = (a[..., 1] - b[..., 1]) ** 2 + (a[..., 2] - b[..., 2]) ** 2
        near = (d2 <= plan.max_d2) & ((a[..., 0] - b[..., 0]).abs() <= plan.max_dt)
        allowed = (near | (a[..., 0] < 0) | (b[..., 0] < 0)) & q_held[:, :, None] & k_held[:, None, :]
        # Distinct powers of two: the sum is their bitwise or (bit 63 wraps to the sign, as the kernels read it).
        words.append((allowed.long() * key_bit).sum(-1))
    bits = torch.cat(words) if masked.numel() else torch.zeros(1, q_block, dtype=torch.int64, device=device)
    kinds = torch.zeros_like(plan.kinds)
    kinds[masked] = torch.arange(1, masked.numel() + 1, dtype=kinds.dtype, device=device)
    # The transpose lists entry (i, j) under key block j: find it in the CSR by the pair's number i·K + j.
    num_k = plan.num_key_blocks
    t_cols = torch.repeat_interleave(torch.arange(num_k, device=device), plan.t_indptr.diff())
    pair, order = torch.sort(rows * num_k + plan.indices)
    t_entry = order[torch.searchsorted(pair, plan.t_indices * num_k + t_cols)]
    return DiscBits(bits, kinds, kinds[t_entry])
