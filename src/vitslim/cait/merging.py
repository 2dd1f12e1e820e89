"""Token merging as plain functions over tensors: ATME (neighbouring asymmetric merging, arXiv
2309.15755), its first, fixed-lattice reading (kept for comparison), ToMe (global bipartite soft
matching, the baseline), window merging (whole local windows, ALGM's local stage) and row/column
merging (CubistMerge's regular grid), the last two grid-keeping baselines. All but row/column
merging share one merge step.

Tokens are ``(B, N, C)`` with ``prefix`` class/distillation/register tokens first; those are
never merged. A ``TokenMap`` travels with the tokens between blocks and records, per image, how
many original patches each token holds (``size``), the grid cell each patch token stands at
(``position``: for a merged token, the cell of the token the others flowed into) and which
current token holds every original patch (``source``), so that ``unmerge`` can restore the full
H×W token map for dense heads.

ATME (our reading, docs/methods-cait.md): at a merging block the current patch tokens alternate
between sources and destinations, as in ToMe's bipartite matching, but a source may only flow
into a destination that stands within ``NEIGHBOUR_RADIUS`` spacings of the *current* token map
(its nearest destination is always allowed), never the reverse. The ``r`` sources most similar
(cosine of the keys) to their best allowed destination merge into it by size-weighted averaging.
Merged tokens stay where their destination stood and may merge again in later blocks, so the
map stays a set of contiguous regions anchored on the grid, coarsening where the image is
uniform and leaving detailed tokens alone.

ATME's first reading (``lattice_merge``, the method ``"atme-lattice"``) fixed the destinations
on a sub-grid instead. Level ``L`` puts destinations on the cells whose row is a multiple of
``2^floor(L/2)`` and whose column is a multiple of ``2^ceil(L/2)``: level 1 keeps every other
column, level 2 one cell per 2×2 window, and so on; every other token may only flow into a
destination within Chebyshev distance ``NEIGHBOURHOOD × max(row step, column step)`` of its cell.
Levels may only grow along the network, so destinations always still exist. On a dense map it
lost to ToMe (benchmarks/results/dinov2/atme-variants.md): at level 1 a 1.5x plan merges nearly
every off-lattice token whatever it holds, and a merged token can only merge again at a coarser
level.

Window merging (the method ``"window"``, after ALGM's local stage, Norouzi et al., CVPR 2024: in
an early layer the tokens of a 2×2 window become one when they are alike, keeping the layout):
the windows are the cells of the sub-grid of ``level``, each window's destination is its top-left
cell (the lattice's destinations at that level) and its other tokens are its sources, which may
only merge into that destination. Only whole windows merge: a window is scored by the least cosine
similarity of the keys of its sources to its destination's, and the ``r // sources per window``
best-scored windows merge all their sources into their destination (size-weighted, by the same
merge step). Windows cut by the grid's edge (a grid side not a multiple of the window's) never
merge. After an earlier lattice or window merge at a lower level a window's tokens are those still
standing on the earlier level's destinations inside it (so a level-4 window after level 2 holds
four level-2 destinations); tokens left over from that level stay as they are.

Row/column merging (the method ``"row-column"``, after CubistMerge, Gong & Lis, arXiv 2509.21764,
written from the paper's description) keeps the patch tokens a regular, smaller grid in row-major
order (``TokenMap.layout``), so that window attention or 2-D position codes could still run on
it: a step merges along rows (each row loses the same number of tokens) or along columns, each
source joining the neighbour on its left or right in its line, and a merged token keeps, per
channel, the value of largest magnitude among its members.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitslim.errors import VitslimError

NEIGHBOUR_RADIUS = 3.0
"""How far an ATME source may reach for a destination, in spacings of the current token map (the
original grid's cell times the square root of how many patches a token holds on average). On
dinov2-s14's saliency maps (training images) radii of 2 to 4 spacings kept the maps within 0.04
IoU of each other and of ToMe's unrestricted matching; 1.5 spacings, or a fixed radius in grid
cells, fell behind once merging had thinned the map (benchmarks/results/dinov2/atme-variants.md)."""

NEIGHBOURHOOD = 2
"""How far a source of the lattice reading may reach for a destination, in sub-grid steps. On vit-d6-cifar10 at a 2×
FLOPs reduction (train images), one step (adjacent windows only) moved the logits furthest from
the unmerged model's; two steps recover most of what the restriction costs (three, or no limit,
add little) while staying local on larger grids (benchmarks/results/cait/design.md, 2.0x rows)."""


def grid_cells(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """``(H*W, 2)`` long: the (row, col) of every grid cell, row-major."""
    rows, cols = grid
    return torch.stack(torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij"), -1).reshape(-1, 2)


@dataclass
class TokenMap:
    """Where the current tokens came from; one row per image."""

    size: torch.Tensor  # (B, N) float: original tokens held by each current token (prefix included)
    position: torch.Tensor  # (B, M, 2) long: grid cell (row, col) of each current patch token
    source: torch.Tensor  # (B, H*W) long: current patch-token index holding each original patch
    prefix: int
    grid: tuple[int, int] = (0, 0)  # (H, W) of the original patch grid
    level: int = 0  # the last lattice or window level merged at (0: none yet; -1: ATME, ToMe or row/column merging has merged)
    layout: tuple[int, int] | None = None  # (rows, columns) while the patch tokens still form a regular row-major grid

    @classmethod
    def identity(cls, batch: int, grid: tuple[int, int], prefix: int, device: torch.device, dtype: torch.dtype) -> TokenMap:
        cells = grid_cells(grid, device)
        return cls(
            size=torch.ones(batch, prefix + len(cells), device=device, dtype=dtype),
            position=cells.expand(batch, -1, -1),
            source=torch.arange(len(cells), device=device).expand(batch, -1),
            prefix=prefix,
            grid=tuple(grid),
            layout=tuple(grid),
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
    """(row step, column step) of the destinations at lattice ``level`` (≥ 1)."""
    if level < 1:
        raise VitslimError(f"sub-grid levels start at 1, got {level}")
    return 1 << (level // 2), 1 << ((level + 1) // 2)


def destination_cells(grid: tuple[int, int], level: int) -> list[tuple[int, int]]:
    """The (row, col) cells of the level's destinations, in grid order."""
    rows, cols = sub_grid(level)
    return [(row, col) for row in range(0, grid[0], rows) for col in range(0, grid[1], cols)]


def neighbourhood(grid: tuple[int, int], level: int, device: torch.device | None = None) -> torch.Tensor:
    """``(H*W, D)`` bool: which of the level's destinations (in grid order) a token standing at
    each grid cell (row-major) may merge into. It depends on the grid alone, so a merge looks
    its rows up instead of comparing every source's cell with every destination's."""
    destinations = torch.tensor(destination_cells(grid, level), device=device)
    distance = (grid_cells(grid, device)[:, None, :] - destinations[None, :, :]).abs().amax(-1)
    return distance <= NEIGHBOURHOOD * max(sub_grid(level))


def _held_cells(grid: tuple[int, int], previous_level: int) -> list[tuple[int, int]]:
    """The cells the leading current patch tokens stand on, in order, after a merge at
    ``previous_level`` (0: none yet, so every cell): that level's destinations in grid order."""
    if previous_level == 0:
        return [(row, col) for row in range(grid[0]) for col in range(grid[1])]
    return destination_cells(grid, previous_level)


def _partition(grid: tuple[int, int], previous_level: int, level: int, patches: int) -> tuple[list[int], list[int]]:
    """Current patch-token indices of the destinations at ``level`` and of the sources, each in
    order. They follow from the grid alone (so no merge sorts or masks to find them, and
    tracing for export sees constants): after a merge at ``previous_level`` the first tokens
    are that level's destinations in grid order (``merge_step`` puts them there), and this
    level's destinations are some of them, since levels never decrease."""
    held = _held_cells(grid, previous_level)
    rows, cols = sub_grid(level)
    lead = [row % rows == 0 and col % cols == 0 for row, col in held]
    destinations = [index for index, on_grid in enumerate(lead) if on_grid]
    sources = [index for index, on_grid in enumerate(lead) if not on_grid] + list(range(len(held), patches))
    return destinations, sources


_GRID_TENSORS: dict[tuple, object] = {}


def _grid_tensors(key: tuple, build):
    """Tensors that depend on the grid and schedule alone, built once per ``key``. While
    ``torch.compile`` or ``torch.export`` traces they are built afresh instead: a trace's fake
    tensors must not outlive it."""
    if torch.compiler.is_compiling():
        return build()
    if key not in _GRID_TENSORS:
        with torch.inference_mode(False):
            _GRID_TENSORS[key] = build()
    return _GRID_TENSORS[key]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return a @ b.transpose(-1, -2)


def _take(values: torch.Tensor, index: torch.Tensor, start: int = 0) -> torch.Tensor:
    """``values[b, start + index[b, i]]`` for every batch row, keeping trailing dimensions.

    One ``index_select`` over the flattened batch, on the whole tensor (``start`` skips the
    prefix tokens without slicing, which would make the flattening copy): on the CPU a ``gather``
    with an index expanded over the channels took 12x as long, which made merging a tenth of a
    small model's forward time."""
    batch, count = values.shape[:2]
    flat = (index + (torch.arange(batch, device=index.device)[:, None] * count + start)).reshape(-1)
    return values.reshape(batch * count, *values.shape[2:]).index_select(0, flat).reshape(*index.shape, *values.shape[2:])


def _add_into(totals: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``totals[b, index[b, i]] += values[b, i]`` (out of place), by one flat ``index_add``."""
    batch, count = totals.shape[:2]
    flat = (index + torch.arange(batch, device=index.device)[:, None] * count).reshape(-1)
    return totals.reshape(batch * count, *totals.shape[2:]).index_add(0, flat, values.reshape(-1, *values.shape[2:])).reshape(totals.shape)


def descending_rank(score: torch.Tensor) -> torch.Tensor:
    """Each score's place ``(B, S)`` when every row is sorted in descending order, equal scores
    in the order they stand.

    Neither torch's sort nor ONNX Runtime's TopK orders equal scores the way the other does, and
    the ONNX exporter cannot write a stable sort. Equal scores are common when CDCP leaves a head
    one or two channels wide (the cosine of one-dimensional keys is ±1), and there the exported
    model merged other tokens than PyTorch's. Counting, for each score, the scores that go before
    it is exact in both runtimes; it costs S² comparisons per image, few beside attention's N²·d."""
    position = torch.arange(score.shape[1], device=score.device)
    before = (score[:, None, :] > score[:, :, None]) | ((score[:, None, :] == score[:, :, None]) & (position[None, :] < position[:, None]))
    return before.sum(dim=2)


def merge_step(tokens: torch.Tensor, token_map: TokenMap, destinations: torch.Tensor, sources: torch.Tensor,
               assignment: torch.Tensor, score: torch.Tensor, r: int, level: int = 0) -> tuple[torch.Tensor, TokenMap]:
    """Merge the ``r`` best-scoring sources into their assigned destinations (size-weighted).

    ``destinations`` ``(B, D)`` and ``sources`` ``(B, S)`` index the patch tokens (after the
    prefix); ``assignment`` ``(B, S)`` indexes ``destinations``; ``score`` ``(B, S)`` ranks the
    sources. The result is ``[prefix, destinations, unmerged sources]``.
    """
    prefix = token_map.prefix
    size = token_map.size
    rank = descending_rank(score)
    order = torch.empty_like(rank).scatter_(1, rank, torch.arange(rank.shape[1], device=rank.device).expand_as(rank))
    merged, kept = order[:, :r], order[:, r:]
    merged_sources, kept_sources = sources.gather(1, merged), sources.gather(1, kept)
    target = assignment.gather(1, merged)
    destination_size = _take(size, destinations, prefix)
    merged_size = _take(size, merged_sources, prefix)
    total = _add_into(_take(tokens, destinations, prefix) * destination_size[..., None], target,
                      _take(tokens, merged_sources, prefix) * merged_size[..., None])
    total_size = _add_into(destination_size, target, merged_size)
    new_tokens = torch.cat([tokens[:, :prefix], total / total_size[..., None], _take(tokens, kept_sources, prefix)], dim=1)

    count = destinations.shape[1]
    new_index = torch.empty_like(token_map.source[:, : tokens.shape[1] - prefix])
    new_index.scatter_(1, destinations, torch.arange(count, device=tokens.device).expand_as(destinations))
    new_index.scatter_(1, kept_sources, torch.arange(count, count + kept.shape[1], device=tokens.device).expand_as(kept_sources))
    new_index.scatter_(1, merged_sources, target)
    new_map = TokenMap(
        size=torch.cat([size[:, :prefix], total_size, _take(size, kept_sources, prefix)], dim=1),
        position=torch.cat([_take(token_map.position, destinations), _take(token_map.position, kept_sources)], dim=1),
        source=new_index.gather(1, token_map.source),
        prefix=prefix,
        grid=token_map.grid,
        level=level,
    )
    return new_tokens, new_map


def lattice_merge(tokens: torch.Tensor, metric: torch.Tensor, token_map: TokenMap, r: int, level: int) -> tuple[torch.Tensor, TokenMap]:
    """ATME's first reading: merge ``r`` sources into neighbouring destinations on the sub-grid of ``level``."""
    if token_map.level < 0:
        raise VitslimError("lattice merging cannot follow ATME or ToMe merges: they do not keep the sub-grid's destinations")
    if level < token_map.level:
        raise VitslimError(f"lattice level {level} after level {token_map.level}: merge levels must not decrease along the network")
    patches = tokens.shape[1] - token_map.prefix
    grid, device = tuple(token_map.grid), tokens.device
    destinations, sources = _grid_tensors(("partition", grid, token_map.level, level, patches, device),
                                          lambda: tuple(torch.tensor(part, device=device) for part in _partition(grid, token_map.level, level, patches)))
    if not 0 <= r <= len(sources):
        raise VitslimError(f"cannot merge {r} tokens at level {level}: only {len(sources)} tokens lie off that sub-grid")
    if r == 0:
        return tokens, token_map
    batch = tokens.shape[0]
    destinations, sources = destinations.expand(batch, -1), sources.expand(batch, -1)
    keys = metric.detach()
    similarity = _cosine(_take(keys, sources, token_map.prefix), _take(keys, destinations, token_map.prefix))
    source_cells = _take(token_map.position, sources)
    flat_cells = source_cells[..., 0] * grid[1] + source_cells[..., 1]
    table = _grid_tensors(("neighbourhood", grid, level, NEIGHBOURHOOD, device), lambda: neighbourhood(grid, level, device))
    allowed = table.index_select(0, flat_cells.reshape(-1)).reshape(*flat_cells.shape, -1)
    score, assignment = similarity.masked_fill(~allowed, float("-inf")).max(dim=-1)
    return merge_step(tokens, token_map, destinations, sources, assignment, score, r, level)


def _bipartite(tokens: torch.Tensor, token_map: TokenMap, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sources, destinations)``, each ``(B, ·)``: the current patch tokens alternately, in their
    order (a source first), after checking that ``r`` sources can merge."""
    patches = tokens.shape[1] - token_map.prefix
    available = (patches + 1) // 2
    if not 0 <= r <= min(available, patches - available):
        raise VitslimError(f"cannot merge {r} of {patches} tokens by bipartite matching (at most {min(available, patches - available)})")
    index = torch.arange(patches, device=tokens.device).expand(tokens.shape[0], -1)
    return index[:, 0::2], index[:, 1::2]


def tome_merge(tokens: torch.Tensor, metric: torch.Tensor, token_map: TokenMap, r: int) -> tuple[torch.Tensor, TokenMap]:
    """ToMe's bipartite soft matching (Bolya et al. 2023): alternate patch tokens form sets A and
    B; each A token may merge into its most similar B token anywhere in the image."""
    sources, destinations = _bipartite(tokens, token_map, r)
    if r == 0:
        return tokens, token_map
    keys = metric.detach()
    score, assignment = _cosine(_take(keys, sources, token_map.prefix), _take(keys, destinations, token_map.prefix)).max(dim=-1)
    return merge_step(tokens, token_map, destinations, sources, assignment, score, r, level=-1)


def neighbours(source_cells: torch.Tensor, destination_cells: torch.Tensor, reach: float) -> torch.Tensor:
    """``(B, S, D)`` bool: the destinations each source may flow into: those whose cell lies
    within Chebyshev distance ``reach`` of the source's, and always the nearest ones, so that no
    source is left without a neighbour where the map has thinned out."""
    source, destination = source_cells.to(torch.float32), destination_cells.to(torch.float32)
    # Row and column distances apart, in float32: the (B, S, D, 2) long tensor reduced over its
    # last axis took 6x as long on the CPU, a third of an ATME merge's time.
    distance = torch.maximum((source[:, :, None, 0] - destination[:, None, :, 0]).abs(),
                             (source[:, :, None, 1] - destination[:, None, :, 1]).abs())
    return distance <= distance.amin(-1, keepdim=True).clamp_min(float(int(reach)))


def atme_merge(tokens: torch.Tensor, metric: torch.Tensor, token_map: TokenMap, r: int,
               radius: float = NEIGHBOUR_RADIUS) -> tuple[torch.Tensor, TokenMap]:
    """ATME: merge the ``r`` sources most similar to a neighbouring destination into it.

    Neighbouring is measured on the current token map: ``radius`` spacings, a spacing being the
    grid cell scaled by the square root of the patches each current token holds on average, so
    that "neighbour" keeps meaning a token or two away however far merging has gone."""
    sources, destinations = _bipartite(tokens, token_map, r)
    if r == 0:
        return tokens, token_map
    patches = tokens.shape[1] - token_map.prefix
    reach = radius * (token_map.source.shape[1] / patches) ** 0.5
    keys = metric.detach()
    similarity = _cosine(_take(keys, sources, token_map.prefix), _take(keys, destinations, token_map.prefix))
    allowed = neighbours(_take(token_map.position, sources), _take(token_map.position, destinations), reach)
    score, assignment = similarity.masked_fill(~allowed, float("-inf")).max(dim=-1)
    return merge_step(tokens, token_map, destinations, sources, assignment, score, r, level=-1)


def whole_windows(grid: tuple[int, int], level: int) -> int:
    """How many windows of ``level`` lie wholly inside the grid (the only ones window merging merges)."""
    rows, cols = sub_grid(level)
    return (grid[0] // rows) * (grid[1] // cols)


def window_sources(previous_level: int, level: int) -> int:
    """The sources of a whole window of ``level`` after a merge at ``previous_level`` (0: none
    yet, ≤ ``level``): the tokens standing on the earlier level's destinations inside it, less
    its own destination. 0 when the levels are equal: every window holds one token."""
    rows, cols = sub_grid(level)
    held_rows, held_cols = sub_grid(previous_level) if previous_level else (1, 1)
    return (rows // held_rows) * (cols // held_cols) - 1


def window_count(r: int, previous_level: int, level: int) -> int:
    """How many whole windows a window merge of ``r`` (> 0) tokens at ``level`` merges after a
    merge at ``previous_level``; an ``r`` that would split a window is refused, naming the
    counts that would not."""
    per_window = window_sources(previous_level, level)
    if per_window == 0:
        raise VitslimError(f"window merging at level {level} after a merge at level {previous_level}: every window holds a single "
                           "token, so window levels must grow along the network")
    if r % per_window:
        raise VitslimError(f"window merging at level {level} merges whole windows of {per_window} sources each: r must be a multiple "
                           f"of {per_window} (0, {per_window}, {2 * per_window}, ...), got {r}")
    return r // per_window


def _window_layout(grid: tuple[int, int], previous_level: int, level: int, patches: int) -> tuple[list, ...]:
    """What a window merge needs to know of the current layout, from the grid alone (so tracing
    for export sees constants): ``_partition``'s destinations and sources at ``level``; per
    source, the position among the destinations of its window's destination (``assignment``; 0
    when it belongs to no whole window) and its window's number (``window``; the number of whole
    windows when none); and per whole window, in grid order, the positions of its sources among
    the sources (``members``, one row of ``window_sources`` each)."""
    destinations, sources = _partition(grid, previous_level, level, patches)
    held = _held_cells(grid, previous_level)
    rows, cols = sub_grid(level)
    owner = {}  # top-left cell of a whole window -> (window number, position of its destination)
    for position, index in enumerate(destinations):
        row, col = held[index]
        if row + rows <= grid[0] and col + cols <= grid[1]:
            owner[(row, col)] = (len(owner), position)
    assignment, window, members = [], [], [[] for _ in owner]
    for position, index in enumerate(sources):
        corner = (held[index][0] // rows * rows, held[index][1] // cols * cols) if index < len(held) else None
        number, destination = owner.get(corner, (len(owner), 0))
        assignment.append(destination)
        window.append(number)
        if number < len(owner):
            members[number].append(position)
    return destinations, sources, assignment, window, members


def window_merge(tokens: torch.Tensor, metric: torch.Tensor, token_map: TokenMap, r: int, level: int) -> tuple[torch.Tensor, TokenMap]:
    """Window merging (ALGM's local stage): merge the ``r // window_sources`` whole windows of
    ``level`` whose tokens are most alike, each wholly into its top-left token.

    A window scores the *least* cosine similarity of its sources' keys to its destination's.
    ALGM thresholds the mean similarity of a window's tokens; here a count ranks the windows
    instead, and the least is the safer rank: after ``unmerge`` every cell of a merged window
    carries the merged features, so the token least like the rest is the one a merge harms
    most, and a mean would let three alike tokens carry a fourth across an object's edge.
    """
    previous = token_map.level
    if previous < 0:
        raise VitslimError("window merging cannot follow ATME or ToMe merges: they do not keep the windows' destinations")
    if level < previous:
        raise VitslimError(f"window level {level} after level {previous}: merge levels must not decrease along the network")
    if r == 0:
        return tokens, token_map
    grid, device = tuple(token_map.grid), tokens.device
    whole = whole_windows(grid, level)
    if window_count(r, previous, level) > whole:
        per_window = window_sources(previous, level)
        raise VitslimError(f"cannot merge {r} tokens by whole windows at level {level}: a {grid[0]}x{grid[1]} grid holds {whole} whole "
                           f"windows of {per_window} sources ({whole * per_window} tokens)")
    patches = tokens.shape[1] - token_map.prefix
    destinations, sources, assignment, window, members = _grid_tensors(
        ("windows", grid, previous, level, patches, device),
        lambda: tuple(torch.tensor(part, device=device) for part in _window_layout(grid, previous, level, patches)))
    batch, count = tokens.shape[0], members.shape[0]
    keys = metric.detach()
    similarity = F.cosine_similarity(_take(keys, sources.expand(batch, -1), token_map.prefix),
                                     _take(keys, destinations[assignment].expand(batch, -1), token_map.prefix), dim=-1)
    score = similarity.index_select(1, members.reshape(-1)).reshape(batch, *members.shape).amin(-1)
    # every source of a window ranks by its window (best: count), sources in no whole window
    # last (0), so merge_step's top r are exactly the best windows' sources, ties or not; the
    # source's place breaks the ties within a rank, so that the kept tokens' order does not
    # depend on how a runtime's sort breaks them (ONNX Runtime's differs from torch's)
    rank = descending_rank(score)
    window_priority = torch.cat([count - rank, rank.new_zeros(batch, 1)], dim=1).index_select(1, window)
    places = sources.shape[0]
    priority = window_priority * places + torch.arange(places - 1, -1, -1, device=device)
    return merge_step(tokens, token_map, destinations.expand(batch, -1), sources.expand(batch, -1),
                      assignment.expand(batch, -1), priority, r, level)


ROWS, COLUMNS = 1, 2  # the direction of a row/column merge: along each row (fewer columns) or along each column


def _line_order(layout: tuple[int, int], direction: int) -> list[int]:
    """The current (row-major) patch-token indices line by line: row by row for ``ROWS``,
    column by column for ``COLUMNS``."""
    rows, cols = layout
    if direction == ROWS:
        return list(range(rows * cols))
    return [row * cols + col for col in range(cols) for row in range(rows)]


def _interleave(even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    """Places 0, 2, 4, ... from ``even`` and 1, 3, 5, ... from ``odd`` along dimension 2 (a line)."""
    pairs = odd.shape[2]
    woven = torch.stack([even[:, :, :pairs], odd], dim=3).reshape(*odd.shape[:2], 2 * pairs, *odd.shape[3:])
    return torch.cat([woven, even[:, :, pairs:]], dim=2)


def row_column_merge(tokens: torch.Tensor, metric: torch.Tensor, token_map: TokenMap, r: int,
                     direction: int) -> tuple[torch.Tensor, TokenMap]:
    """A CubistMerge-style merge (Gong & Lis, arXiv 2509.21764; written from the paper's
    description): the patch tokens stay a regular grid. Along each line (every row for ``ROWS``,
    every column for ``COLUMNS``) the tokens at odd places are sources and may merge into the
    token next to them on either side; each line merges the same number of sources, its
    ``r // lines`` most similar ones (cosine of the keys), so that every line shrinks alike and
    the layout stays rectangular with the tokens' order kept. A merged token takes, per
    channel, the value of largest magnitude among its members (the paper's max-magnitude
    representation, which keeps salient features an average would wash out)."""
    if token_map.layout is None:
        raise VitslimError("row/column merging needs the tokens on a regular grid: it cannot follow ATME, ToMe, lattice or window merges")
    if direction not in (ROWS, COLUMNS):
        raise VitslimError(f"a row/column merge's direction is {ROWS} (along rows) or {COLUMNS} (along columns), got {direction}")
    rows, cols = token_map.layout
    lines, length = (rows, cols) if direction == ROWS else (cols, rows)
    if r % lines or not 0 <= r // lines <= length // 2:
        raise VitslimError(f"a row/column merge along {'rows' if direction == ROWS else 'columns'} of a {rows}x{cols} layout merges the "
                           f"same number of tokens in each of its {lines} lines, at most {length // 2} each: r must be a multiple of "
                           f"{lines} up to {lines * (length // 2)}, got {r}")
    if r == 0:
        return tokens, token_map
    per_line, prefix, batch, device = r // lines, token_map.prefix, tokens.shape[0], tokens.device
    old_order = _grid_tensors(("line order", (rows, cols), direction, device),
                              lambda: torch.tensor(_line_order((rows, cols), direction), device=device))
    line_index = old_order.expand(batch, -1)  # line-major place -> current (row-major) patch token
    values = _take(tokens, line_index, prefix).reshape(batch, lines, length, -1)
    keys = _take(metric.detach(), line_index, prefix).reshape(batch, lines, length, -1)
    keys = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sizes = _take(token_map.size, line_index, prefix).reshape(batch, lines, length)
    cells = _take(token_map.position, line_index).reshape(batch, lines, length, 2)

    sources, destinations = length // 2, (length + 1) // 2  # source i stands at 2i+1, between destinations i and i+1
    source_keys, destination_keys = keys[:, :, 1::2], keys[:, :, 0::2]
    left = (source_keys * destination_keys[:, :, :sources]).sum(-1)
    right = (source_keys[:, :, : destinations - 1] * destination_keys[:, :, 1:]).sum(-1)
    right = torch.cat([right, torch.full_like(left[:, :, : sources - right.shape[2]], float("-inf"))], dim=2)  # an even line's last source
    into_left = left >= right
    rank = descending_rank(torch.maximum(left, right).reshape(batch * lines, sources)).reshape(batch, lines, sources)
    merged = rank < per_line
    into_left, into_right = merged & into_left, merged & ~into_left  # source i joins destination i, or destination i+1

    none = torch.zeros(batch, lines, 1, dtype=torch.bool, device=device)
    takes_right = torch.cat([into_left, none], dim=2)[:, :, :destinations]  # destination i takes source i
    takes_left = torch.cat([none, into_right], dim=2)[:, :, :destinations]  # destination i takes source i-1
    source_values, combined = values[:, :, 1::2], values[:, :, 0::2]
    for takes, candidate in ((takes_right, torch.cat([source_values, combined[:, :, :1]], dim=2)[:, :, :destinations]),
                             (takes_left, torch.cat([combined[:, :, :1], source_values], dim=2)[:, :, :destinations])):
        candidate = torch.where(takes[..., None], candidate, combined)
        combined = torch.where(candidate.abs() > combined.abs(), candidate, combined)
    source_sizes = sizes[:, :, 1::2]
    combined_sizes = (sizes[:, :, 0::2] + takes_right * torch.cat([source_sizes, sizes[:, :, :1]], dim=2)[:, :, :destinations]
                      + takes_left * torch.cat([sizes[:, :, :1], source_sizes], dim=2)[:, :, :destinations])

    # each line after merging: its destinations and the sources left, in their order
    keep = _interleave(torch.ones(batch, lines, destinations, dtype=torch.bool, device=device), ~merged)
    place = keep.long().cumsum(2) - 1  # a kept token's place in its shortened line
    new_length = length - per_line
    home = torch.arange(length, device=device).expand(batch, lines, -1)
    slot = torch.where(keep, place, torch.full_like(place, new_length))  # merged sources go to a place sliced off below
    kept = torch.zeros(batch, lines, new_length + 1, dtype=torch.long, device=device).scatter_(2, slot, home)[:, :, :new_length]
    line_values = _interleave(combined, source_values)
    new_values = line_values.gather(2, kept[..., None].expand(-1, -1, -1, line_values.shape[-1]))
    new_sizes = _interleave(combined_sizes, source_sizes).gather(2, kept)
    new_cells = cells.gather(2, kept[..., None].expand(-1, -1, -1, 2))

    # where each current token goes: to its own new place, or to its destination's
    source_home = home[:, :, 1::2]
    target = _interleave(home[:, :, 0::2], torch.where(into_left, source_home - 1, torch.where(into_right, source_home + 1, source_home)))
    new_line_place = (place.gather(2, target) + torch.arange(lines, device=device)[None, :, None] * new_length).reshape(batch, -1)
    new_layout = (rows, new_length) if direction == ROWS else (new_length, cols)
    new_order = _grid_tensors(("line order", new_layout, direction, device),
                              lambda: torch.tensor(_line_order(new_layout, direction), device=device))
    count = new_layout[0] * new_layout[1]
    line_of = torch.empty_like(new_order).scatter_(0, new_order, torch.arange(count, device=device)).expand(batch, -1)
    new_index = torch.empty_like(line_index).scatter_(1, line_index, new_order[new_line_place])
    new_map = TokenMap(
        size=torch.cat([token_map.size[:, :prefix], _take(new_sizes.reshape(batch, count), line_of)], dim=1),
        position=_take(new_cells.reshape(batch, count, 2), line_of),
        source=new_index.gather(1, token_map.source),
        prefix=prefix,
        grid=token_map.grid,
        level=-1,
        layout=new_layout,
    )
    return torch.cat([tokens[:, :prefix], _take(new_values.reshape(batch, count, -1), line_of)], dim=1), new_map


def unmerge(tokens: torch.Tensor, token_map: TokenMap) -> torch.Tensor:
    """The full ``(B, prefix + H*W, C)`` token map: every original patch position gets the
    features of the token that now holds it."""
    prefix = token_map.prefix
    return torch.cat([tokens[:, :prefix], _take(tokens, token_map.source, prefix)], dim=1)


def representatives(token_map: TokenMap) -> torch.Tensor:
    """``(B, M)`` long: for every current patch token, one original patch position it holds (the
    first), so that ``compact`` can take each token back out of an unmerged map. Any position
    would do, since ``unmerge`` gives all of a token's positions the same features; the first
    makes the choice deterministic (a plain scatter would let duplicates race)."""
    batch, positions = token_map.source.shape
    current = token_map.size.shape[1] - token_map.prefix
    every = torch.arange(positions, device=token_map.source.device).expand(batch, -1)
    first = torch.full((batch, current), positions, dtype=torch.long, device=token_map.source.device)
    return first.scatter_reduce(1, token_map.source, every, reduce="amin")


def compact(tokens: torch.Tensor, kept: torch.Tensor, prefix: int) -> torch.Tensor:
    """The inverse of ``unmerge``: from a full ``(B, prefix + H*W, C)`` map, the prefix tokens and
    the patch token at each position of ``kept`` (see ``representatives``)."""
    return torch.cat([tokens[:, :prefix], _take(tokens, kept, prefix)], dim=1)
