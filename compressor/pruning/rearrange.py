"""Mask rearrangement (Kwon et al. 2022, section 4.2): once the search has fixed how many members of a unit group
(one layer's heads, one layer's FFN neurons, one adapter's bottleneck) stay, re-choose which ones with the group's
block of the empirical Fisher information matrix, F = sum over examples of g g' (g: the example's gradient of the
loss w.r.t. the group's mask variables at the all-ones mask), instead of its diagonal alone.

Removing the members in P changes the loss by about 1/2 d' F d with d the indicator of P (the mask difference), a
quadratic that the diagonal ranking ignores the off-diagonal part of: two members whose gradients cancel (one
undoes the other) are cheap to remove together though each alone is costly. The greedy swap (after Kwon's
`greedy_rearrange`, written here in the O(n) incremental form): visit the kept members in increasing Fisher order;
add each to P, then drop from P the member whose removal leaves the lowest d' F d. The set kept each step is the
best of candidates that include the previous one, so the estimate never rises; the count of kept members, hence
every cost the search counted, stays the same.
"""

from __future__ import annotations

import torch


def quadratic_loss(fisher: torch.Tensor, keep: torch.Tensor) -> float:
    """d' F d for the mask difference d = 1 - keep (the loss estimate up to the factor 1/2)."""
    d = (~keep.flatten().bool()).double()
    return float(d @ fisher.double() @ d)


@torch.no_grad()
def rearrange(keep: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """The greedy rearrangement of one group's mask (True = keep) under its Fisher block [n, n]; same count kept,
    deterministic (ties keep the current set, then the lowest index)."""
    shape, keep = keep.shape, keep.flatten().bool()
    F = fisher.double()
    n = keep.numel()
    pruned = ~keep
    if n == 0 or bool(pruned.all()) or not bool(pruned.any()):
        return keep.view(shape).clone()
    diag = F.diagonal()
    v = F[:, pruned].sum(1)  # v_k = sum over P of F_kj
    order = sorted(keep.nonzero().flatten().tolist(), key=lambda i: (float(diag[i]), i))
    inf = torch.tensor(float("inf"), dtype=F.dtype)
    for j in order:
        pruned[j] = True
        v += F[:, j]
        # removing k from P + j lowers d'Fd by 2 v_k - F_kk; only members of P are candidates
        rise = torch.where(pruned, diag - 2 * v, inf)
        k = int(rise.argmin())
        if float(rise[k]) >= float(rise[j]):
            k = j  # a tie keeps the set as it was
        pruned[k] = False
        v -= F[:, k]
    return (~pruned).view(shape)


def rearrange_masks(masks: dict, blocks: dict) -> tuple:
    """Rearrange every group of `masks` that has a Fisher block in `blocks` (unit key -> [n, n]). Returns the new
    masks and a report per group: members swapped and the quadratic estimate before and after."""
    out, report = dict(masks), []
    for key in sorted(blocks):
        before_mask = masks[key]
        after_mask = rearrange(before_mask, blocks[key])
        swapped = int((before_mask.flatten().bool() & ~after_mask.flatten()).sum())
        out[key] = after_mask
        report.append(dict(key=key, swapped=swapped, loss_before=quadratic_loss(blocks[key], before_mask),
                           loss_after=quadratic_loss(blocks[key], after_mask)))
    return out, report
