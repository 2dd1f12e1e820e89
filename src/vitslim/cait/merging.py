"""Token merging as plain functions over tensors: ATME (neighbour-restricted, arXiv 2309.15755)
and ToMe (global bipartite soft matching, the baseline), sharing one merge step.

Tokens are ``(B, N, C)`` with ``prefix`` class/distillation/register tokens first; those are
never merged. A ``TokenMap`` travels with the tokens between blocks and records, per image, how
many original patches each token holds (``size``), the grid cell each patch token stands at
(``position``) and which current token holds every original patch (``source``), so that
``unmerge`` can restore the full H×W token map for dense heads.

ATME (our reading, DESIGN.md §1.2): a merging block works at a sub-grid *level*. Level ``L``
puts destinations on the cells whose row is a multiple of ``2^floor(L/2)`` and whose column is a
multiple of ``2^ceil(L/2)``: level 1 keeps every other column (half the tokens are
destinations), level 2 one cell per 2×2 window, level 3 one per 2×4, and so on. Every other
token is a source and may only flow into a destination within Chebyshev distance
``NEIGHBOURHOOD × max(row step, column step)`` of its cell (its window and two rings of windows
around it), never the reverse. The ``r`` sources most similar
(cosine of the keys) to their best allowed destination are merged into it by size-weighted
averaging. Destinations never move, so the merged map keeps its spatial layout. Levels may only
grow along the network: each level's destinations are destinations at every lower level too, so
they always still exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitslim.errors import VitslimError

NEIGHBOURHOOD = 2
"""How far a source may reach for a destination, in sub-grid steps. On vit-d6-cifar10 at a 2×
FLOPs reduction (held-out train images, ``benchmarks/cait_design.py``), top-1 agreement with the
unmerged model was 85.1% with one step (adjacent windows only), 86.7% with two, 87.2% with no
limit, and 87.8% for ToMe: two steps recover most of what the restriction costs while staying
local on larger grids."""


@dataclass
class TokenMap:
    """Where the current tokens came from; one row per image."""

    size: torch.Tensor  # (B, N) float: original tokens held by each current token (prefix included)
    position: torch.Tensor  # (B, M, 2) long: grid cell (row, col) of each current patch token
    source: torch.Tensor  # (B, H*W) long: current patch-token index holding each original patch
    prefix: int
    grid: tuple[int, int] = (0, 0)  # (H, W) of the original patch grid
    level: int = 0  # the last ATME level merged at (0: none yet; -1: ToMe has merged)

    @classmethod
    def identity(cls, batch: int, grid: tuple[int, int], prefix: int, device: torch.device, dtype: torch.dtype) -> "TokenMap":
        rows, cols = grid
        cells = torch.stack(torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij"), -1).reshape(-1, 2)
        return cls(
            size=torch.ones(batch, prefix + rows * cols, device=device, dtype=dtype),
            position=cells.expand(batch, -1, -1),
            source=torch.arange(rows * cols, device=device).expand(batch, -1),
            prefix=prefix,
            grid=(rows, cols),
        )

    @property
    def merged(self) -> bool:
        return self.size.shape[1] - self.prefix < self.source.shape[1]


def attention_bias(token_map: TokenMap) -> torch.Tensor:
    """Proportional attention as an additive bias on the attention logits, ``(B, 1, 1, N)``.

    Adding ``log(s)`` for a key of size ``s`` is exactly attention over ``s`` identical copies of
    that key (``exp(a + log s) = s·exp(a)``), and as an ``attn_mask`` it keeps
    ``scaled_dot_product_attention``'s fused kernel in use.
    """
    return token_map.size.log()[:, None, None, :]


def sub_grid(level: int) -> tuple[int, int]:
    """(row step, column step) of the destinations at ATME ``level`` (≥ 1)."""
    if level < 1:
        raise VitslimError(f"ATME levels start at 1, got {level}")
    return 1 << (level // 2), 1 << ((level + 1) // 2)


def on_sub_grid(cells: torch.Tensor, level: int) -> torch.Tensor:
    rows, cols = sub_grid(level)
    return (cells[..., 0] % rows == 0) & (cells[..., 1] % cols == 0)


def atme_candidates(source_cells: torch.Tensor, destination_cells: torch.Tensor, level: int) -> torch.Tensor:
    """``(B, S, D)`` bool: which destinations each source may merge into (its neighbourhood)."""
    distance = (source_cells[:, :, None, :] - destination_cells[:, None, :, :]).abs().amax(-1)
    return distance <= NEIGHBOURHOOD * max(sub_grid(level))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return a @ b.transpose(-1, -2)


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[b, index[b, i]]`` for every batch row, keeping trailing dimensions."""
    expanded = index.reshape(*index.shape, *([1] * (values.dim() - 2))).expand(*index.shape, *values.shape[2:])
    return values.gather(1, expanded)


def merge_step(tokens: torch.Tensor, token_map: TokenMap, destinations: torch.Tensor, sources: torch.Tensor,
               assignment: torch.Tensor, score: torch.Tensor, r: int, level: int = 0) -> tuple[torch.Tensor, TokenMap]:
    """Merge the ``r`` best-scoring sources into their assigned destinations (size-weighted).

    ``destinations`` ``(B, D)`` and ``sources`` ``(B, S)`` index the patch tokens (after the
    prefix); ``assignment`` ``(B, S)`` indexes ``destinations``; ``score`` ``(B, S)`` ranks the
    sources. The result is ``[prefix, destinations, unmerged sources]``.
    """
    prefix = token_map.prefix
    head, patches = tokens[:, :prefix], tokens[:, prefix:]
    head_size, patch_size = token_map.size[:, :prefix], token_map.size[:, prefix:]
    order = score.argsort(dim=1, descending=True)
    merged, kept = order[:, :r], order[:, r:]
    merged_sources, kept_sources = sources.gather(1, merged), sources.gather(1, kept)
    target = assignment.gather(1, merged)
    total_size = _take(patch_size, destinations)
    total = _take(patches, destinations) * total_size[..., None]
    merged_size = _take(patch_size, merged_sources)
    total.scatter_add_(1, target[..., None].expand(-1, -1, tokens.shape[-1]), _take(patches, merged_sources) * merged_size[..., None])
    total_size = total_size.scatter_add(1, target, merged_size)
    new_tokens = torch.cat([head, total / total_size[..., None], _take(patches, kept_sources)], dim=1)

    count = destinations.shape[1]
    new_index = torch.empty_like(token_map.source[:, : patches.shape[1]])
    new_index.scatter_(1, destinations, torch.arange(count, device=tokens.device).expand_as(destinations))
    new_index.scatter_(1, kept_sources, torch.arange(count, count + kept.shape[1], device=tokens.device).expand_as(kept_sources))
    new_index.scatter_(1, merged_sources, target)
    new_map = TokenMap(
        size=torch.cat([head_size, total_size, _take(patch_size, kept_sources)], dim=1),
        position=torch.cat([_take(token_map.position, destinations), _take(token_map.position, kept_sources)], dim=1),
        source=new_index.gather(1, token_map.source),
        prefix=prefix,
        grid=token_map.grid,
        level=level,
    )
    return new_tokens, new_map


def atme_merge(tokens: torch.Tensor, metric: torch.Tensor, token_map: TokenMap, r: int, level: int) -> tuple[torch.Tensor, TokenMap]:
    """ATME: merge ``r`` sources into neighbouring destinations on the sub-grid of ``level``."""
    if token_map.level < 0:
        raise VitslimError("ATME cannot follow ToMe merges: ToMe does not keep the sub-grid's destinations")
    if level < token_map.level:
        raise VitslimError(f"ATME level {level} after level {token_map.level}: merge levels must not decrease along the network")
    rows, cols = sub_grid(level)
    # every destination of this level is still a token (levels never decrease), so the count is
    # known without looking at the data, which keeps the merge traceable for ONNX export
    destination_count = -(-token_map.grid[0] // rows) * -(-token_map.grid[1] // cols)
    on_grid = on_sub_grid(token_map.position, level)
    available = on_grid.shape[1] - destination_count
    if not 0 <= r <= available:
        raise VitslimError(f"cannot merge {r} tokens at level {level}: only {available} tokens lie off that sub-grid")
    if r == 0:
        return tokens, token_map
    patches = on_grid.shape[1]
    # destinations first, each group in grid order; unique keys make a plain sort deterministic
    # (ONNX has no stable sort)
    order = ((~on_grid).long() * patches + torch.arange(patches, device=on_grid.device)).argsort(dim=1)
    destinations, sources = order[:, :destination_count], order[:, destination_count:]
    keys = metric[:, token_map.prefix:].detach()
    similarity = _cosine(_take(keys, sources), _take(keys, destinations))
    allowed = atme_candidates(_take(token_map.position, sources), _take(token_map.position, destinations), level)
    score, assignment = similarity.masked_fill(~allowed, float("-inf")).max(dim=-1)
    return merge_step(tokens, token_map, destinations, sources, assignment, score, r, level)


def tome_merge(tokens: torch.Tensor, metric: torch.Tensor, token_map: TokenMap, r: int) -> tuple[torch.Tensor, TokenMap]:
    """ToMe's bipartite soft matching (Bolya et al. 2023): alternate patch tokens form sets A and
    B; each A token may merge into its most similar B token anywhere in the image."""
    patches = tokens.shape[1] - token_map.prefix
    available = (patches + 1) // 2
    if not 0 <= r <= min(available, patches - available):
        raise VitslimError(f"cannot merge {r} of {patches} tokens by bipartite matching (at most {min(available, patches - available)})")
    if r == 0:
        return tokens, token_map
    index = torch.arange(patches, device=tokens.device).expand(tokens.shape[0], -1)
    sources, destinations = index[:, 0::2], index[:, 1::2]
    keys = metric[:, token_map.prefix:].detach()
    score, assignment = _cosine(_take(keys, sources), _take(keys, destinations)).max(dim=-1)
    return merge_step(tokens, token_map, destinations, sources, assignment, score, r, level=-1)


def unmerge(tokens: torch.Tensor, token_map: TokenMap) -> torch.Tensor:
    """The full ``(B, prefix + H*W, C)`` token map: every original patch position gets the
    features of the token that now holds it."""
    prefix = token_map.prefix
    return torch.cat([tokens[:, :prefix], _take(tokens[:, prefix:], token_map.source)], dim=1)
