"""Merge schedules: how many tokens each block merges, and what that saves.

A schedule is planned from one number, the tokens merged in all, shared among the blocks before
the last in proportion to how many blocks follow each one (block i of a depth-d model weighs
d-1-i, raised to a ``concentration`` of 1 unless chosen otherwise: ``cait.shape``), by
cumulative rounding. Tokens merged early save every later block's work, so this
front-loaded plan reaches a FLOPs target with fewer merges than an even spread. On
vit-d6-cifar10 (train images) its KL from the unmerged model matched the even spread's at 1.3x
and beat it at 1.6x for both methods, and at 2x an even spread would break the cap below. No
other one-number rule, nor a grid search over blocks 0-3, did clearly better for both methods at
every target (docs/cait.md, "Where to merge"; benchmarks/results/cait/schedules.md).

ATME and ToMe match half of a block's tokens against the other half, so neither merges more
than half of a block's patch tokens. The lattice reading of ATME starts at sub-grid level 1
(every other column holds destinations) and moves to the next coarser level whenever the current
one has fewer tokens off its grid than the block should merge; it is held to the same cap, since
without it its plans starve the last blocks (a 2x plan on vit-d6-cifar10 left the
final block 2 patch tokens, and agreement with the unmerged model fell from 88% to 80% in an
earlier version of ``benchmarks/studies/cait_design.py``). So both methods get the same counts per
block. The FLOPs model (``cait.flops``) counts each block's matmuls from the layer shapes, so a
target speed-up can be turned into a schedule before anything is measured.

Row/column merging rounds each block's share to whole tokens per line of its current layout (at
most half a line) and alternates between merging along rows and along columns.

Window merging (ALGM's local stage) is planned differently: one step, after ``WINDOW_BLOCK``, of
whole 2×2 windows, as many as the total asks for. It merges three of every window's four tokens,
so the half cap does not hold for it, and ``concentration`` has nothing to shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vitslim.adapters.base import ViTSpec
from vitslim.cait.flops import blocks_flops
from vitslim.cait.merging import COLUMNS, NEIGHBOUR_RADIUS, ROWS, sub_grid, whole_windows, window_count, window_sources
from vitslim.errors import VitslimError

MERGES = ("atme", "tome", "window", "row-column", "atme-lattice")  # the merge kinds: the Cait config's ``merge``
LEVELLED = ("atme-lattice", "window")  # the kinds whose steps name a sub-grid level

WINDOW_BLOCK = 1
"""The block after which window merging merges. ALGM merges its windows in the first layer,
between attention and MLP, on the features that one attention has seen. Here a merge takes the
keys of the block it follows, computed from that block's input, so after block 0 they would come
from the embedded patches, before any attention; block 1's keys come from block 0's output, the
nearest to what ALGM's merge compares, at the cost of one more block run on every token."""

WINDOW_LEVEL = 2
"""The sub-grid level of window merging: 2×2 windows, ALGM's."""


@dataclass(frozen=True)
class MergeSchedule:
    """Which blocks merge, how many tokens, and (lattice, window) the destination sub-grid's level.

    ``steps`` holds ``(block, r, level)``: after block ``block``, ``r`` tokens are merged away
    (``merging.sub_grid`` gives a level's grid; ATME and ToMe ignore it, and plans give them 1;
    for row/column merging it is the direction, ``merging.ROWS`` or ``merging.COLUMNS``).
    Window merging merges whole windows only, so its ``r`` is a multiple of a window's sources at
    its level after the previous merging step's (``merging.window_count``). ``radius`` is ATME's
    neighbourhood, in spacings of the current token map.
    """

    merge: str  # the merge kind, one of MERGES
    steps: tuple[tuple[int, int, int], ...]
    radius: float = NEIGHBOUR_RADIUS

    def __post_init__(self) -> None:
        if self.merge not in MERGES:
            raise VitslimError(f"unknown merge kind {self.merge!r}; choose one of {', '.join(MERGES)}")
        blocks = [block for block, _, _ in self.steps]
        if blocks != sorted(set(blocks)):
            raise VitslimError("a merge schedule names each block at most once, in order")
        for block, r, level in self.steps:
            if r < 0 or level < 1:
                raise VitslimError(f"block {block}: merge counts are ≥ 0 and levels ≥ 1 (got r={r}, level={level})")
        if not self.radius > 0:
            raise VitslimError(f"ATME's neighbourhood radius must be positive, got {self.radius:g}")
        levels = [level for _, _, level in self.steps]
        if self.merge == "row-column" and not set(levels) <= {ROWS, COLUMNS}:
            raise VitslimError(f"row/column merging's steps name a direction, {ROWS} (along rows) or {COLUMNS} (along columns), got {levels}")
        if self.merge in LEVELLED and levels != sorted(levels):
            raise VitslimError(f"{'lattice' if self.merge == 'atme-lattice' else 'window'} levels must not decrease along the network "
                               "(destinations must persist)")
        if self.merge == "window":
            previous = 0
            for block, r, level in self.steps:
                if r:
                    try:
                        window_count(r, previous, level)
                    except VitslimError as error:
                        raise VitslimError(f"block {block}: {error}") from None
                    previous = level

    @property
    def merged(self) -> int:
        return sum(r for _, r, _ in self.steps)

    def as_dict(self) -> dict:
        return {"merge": self.merge, "steps": [list(step) for step in self.steps], **({"radius": float(self.radius)} if self.merge == "atme" else {})}

    @classmethod
    def from_dict(cls, data: dict) -> MergeSchedule:
        merge = recorded_merge(data)
        return cls(merge, tuple(tuple(int(v) for v in step) for step in data["steps"]),
                   **({"radius": float(data["radius"])} if merge == "atme" else {}))


def merge_key(data: dict) -> str:
    """The key of the merge kind in a schedule's dict: "merge", or "method" in recipes written before 0.2."""
    return "merge" if "merge" in data else "method"


def recorded_merge(data: dict) -> str:
    """The merge kind a schedule's dict names. Schedules written before 0.3 called the lattice
    reading "atme"; ATME's schedules record their ``radius`` since, so an "atme" without one is
    the lattice."""
    merge = data[merge_key(data)]
    return "atme-lattice" if merge == "atme" and "radius" not in data else merge


def destinations(grid: tuple[int, int], level: int) -> int:
    rows, cols = sub_grid(level)
    return math.ceil(grid[0] / rows) * math.ceil(grid[1] / cols)


def mergeable(merge: str, patches: int, grid: tuple[int, int], level: int, previous_level: int = 0) -> int:
    """Tokens one block can merge away with ``patches`` patch tokens left; window merging, after
    a merge at ``previous_level`` (0: none yet), can merge its whole windows' sources only."""
    if merge in ("atme", "tome"):
        return patches // 2
    if merge == "window":
        return whole_windows(grid, level) * window_sources(previous_level, level)
    return max(patches - destinations(grid, level), 0)


def top_level(grid: tuple[int, int]) -> int:
    """The first level whose sub-grid holds a single destination."""
    level = 1
    while destinations(grid, level) > 1:
        level += 1
    return level


def row_column_step(layout: tuple[int, int], r: int, direction: int) -> tuple[int, int]:
    """The layout after a row/column merge of ``r`` tokens, or an error naming what it allows."""
    rows, cols = layout
    lines, length = (rows, cols) if direction == ROWS else (cols, rows)
    if r % lines or r // lines > length // 2:
        raise VitslimError(f"a row/column merge along {'rows' if direction == ROWS else 'columns'} of a {rows}x{cols} layout merges "
                           f"the same number in each of its {lines} lines, at most {length // 2} each: r must be a multiple of {lines} "
                           f"up to {lines * (length // 2)}, got {r}")
    return (rows, cols - r // lines) if direction == ROWS else (rows - r // lines, cols)


def check_schedule(schedule: MergeSchedule, grid: tuple[int, int], prefix: int) -> None:
    """Refuse a schedule that merges more tokens than a block can offer."""
    if schedule.merge == "row-column":
        layout = tuple(grid)
        for block, r, direction in schedule.steps:
            try:
                layout = row_column_step(layout, r, direction)
            except VitslimError as error:
                raise VitslimError(f"block {block}: {error}") from None
        return
    patches, previous = grid[0] * grid[1], 0
    for block, r, level in schedule.steps:
        available = mergeable(schedule.merge, patches, grid, level, previous)
        if r > available:
            raise VitslimError(
                f"block {block} would merge {r} tokens, but only {available} of its {patches} patch tokens can merge"
                + (f" at level {level}" if schedule.merge in LEVELLED else "")
            )
        patches -= r
        if r:
            previous = level


def plan(merge: str, grid: tuple[int, int], depth: int, total: float, concentration: float = 1.0,
         first_level: int = 1) -> MergeSchedule:
    """Merge ``total`` tokens, block i's share weighing (depth-1-i) ** concentration, no block
    more than half of its patch tokens (a total beyond what the caps allow halves every block's
    tokens). The lattice reading starts at sub-grid level ``first_level``: at level 1 only every other column's
    tokens can merge, so on a fine grid a 1.5x plan merges nearly all of them whatever they hold,
    while level 2 leaves three in four tokens to choose from (``cait.shape`` chooses). Window
    merging plans by ``window_plan`` and ignores ``concentration``: its one step has nothing to
    share out."""
    if total < 0:
        raise VitslimError("the number of tokens to merge must be ≥ 0")
    if concentration < 0:
        raise VitslimError(f"a merge schedule's concentration must be ≥ 0 (0 spreads merges evenly), got {concentration:g}")
    if merge == "window":
        return window_plan(grid, depth, total)
    if merge == "row-column":
        return row_column_plan(grid, depth, total, concentration)
    weights = [(depth - 1 - block) ** concentration for block in range(depth - 1)]
    whole = sum(weights)
    if first_level < 1:
        raise VitslimError(f"the lattice's first level must be at least 1, got {first_level}")
    patches, merged, level, share = grid[0] * grid[1], 0, min(first_level, top_level(grid)), 0.0
    steps = []
    for block, weight in enumerate(weights):
        share += total * weight / whole
        wanted = min(round(share) - merged, patches // 2)
        if merge == "atme-lattice":
            while mergeable(merge, patches, grid, level) < wanted and level < top_level(grid):
                level += 1
        r = min(wanted, mergeable(merge, patches, grid, level))
        if r > 0:
            steps.append((block, r, level if merge == "atme-lattice" else 1))
            patches -= r
            merged += r
    return MergeSchedule(merge, tuple(steps))


def row_column_plan(grid: tuple[int, int], depth: int, total: float, concentration: float) -> MergeSchedule:
    """Row/column merging's plan: the blocks' shares as in ``plan``, each rounded to whole
    tokens per line (at most half a line), the directions alternating from one merging step to
    the next (along rows first), so that the grid shrinks in both directions."""
    weights = [(depth - 1 - block) ** concentration for block in range(depth - 1)]
    whole = sum(weights)
    layout, direction, merged, share, steps = tuple(grid), ROWS, 0, 0.0, []
    for block, weight in enumerate(weights):
        share += total * weight / whole
        lines, length = layout if direction == ROWS else layout[::-1]
        per_line = min(round((round(share) - merged) / lines), length // 2)
        if per_line > 0:
            steps.append((block, per_line * lines, direction))
            layout = row_column_step(layout, per_line * lines, direction)
            merged += per_line * lines
            direction = COLUMNS if direction == ROWS else ROWS
    return MergeSchedule("row-column", tuple(steps))


def window_plan(grid: tuple[int, int], depth: int, total: float) -> MergeSchedule:
    """Window merging's plan: one step after ``WINDOW_BLOCK`` that merges the fewest whole
    2×2 windows reaching ``total`` tokens (3 per window), or every whole window when that is
    not enough; none when no block follows ``WINDOW_BLOCK``. There is no second, coarser stage:
    ALGM merges locally once (its later stage is global matching, another method), so a
    speed-up beyond merging every window is beyond this method, and ``schedule_for_speedup``
    says so."""
    per_window = window_sources(0, WINDOW_LEVEL)
    windows = min(math.ceil(round(total) / per_window), whole_windows(grid, WINDOW_LEVEL))
    if windows == 0 or depth <= WINDOW_BLOCK + 1:
        return MergeSchedule("window", ())
    return MergeSchedule("window", ((WINDOW_BLOCK, windows * per_window, WINDOW_LEVEL),))


def tokens_per_block(schedule: MergeSchedule | None, spec: ViTSpec) -> list[int]:
    """The number of tokens each block processes under ``schedule``."""
    tokens = spec.num_prefix_tokens + spec.num_patches
    merges = {block: r for block, r, _ in schedule.steps} if schedule else {}
    counts = []
    for index in range(len(spec.blocks)):
        counts.append(tokens)
        tokens -= merges.get(index, 0)
    return counts


def predicted_speedup(spec: ViTSpec, schedule: MergeSchedule | None, reference: ViTSpec | None = None) -> float:
    """The blocks' FLOPs of ``reference`` (default: ``spec`` itself, unmerged) over those of
    ``spec`` under ``schedule``: the speed-up if time followed the blocks' matmuls."""
    reference = reference or spec
    full = [reference.num_prefix_tokens + reference.num_patches] * len(reference.blocks)
    return blocks_flops(reference, full) / blocks_flops(spec, tokens_per_block(schedule, spec))


def strongest_schedule(spec: ViTSpec, merge: str, concentration: float = 1.0, first_level: int = 1) -> MergeSchedule:
    """The plan that merges all it can: every block's cap binds."""
    return plan(merge, spec.grid_size, len(spec.blocks), float(len(spec.blocks) * spec.num_patches), concentration, first_level)


def schedule_for_speedup(spec: ViTSpec, merge: str, speedup: float, *, reference: ViTSpec | None = None,
                         concentration: float = 1.0, first_level: int = 1) -> MergeSchedule:
    """The gentlest planned schedule whose predicted speed-up (against ``reference``) reaches ``speedup``."""
    grid, depth = spec.grid_size, len(spec.blocks)
    ceiling = float(depth * spec.num_patches)
    most = strongest_schedule(spec, merge, concentration, first_level)
    if predicted_speedup(spec, most, reference) < speedup:
        raise VitslimError(
            f"a {speedup:g}x speed-up is beyond token merging here: merging everything it can gives "
            f"{predicted_speedup(spec, most, reference):.2f}x by the FLOPs model; ask for less, or add channel pruning (epochs > 0)"
        )
    low, high = 0.0, ceiling
    for _ in range(40):
        middle = (low + high) / 2
        if predicted_speedup(spec, plan(merge, grid, depth, middle, concentration, first_level), reference) >= speedup:
            high = middle
        else:
            low = middle
    return plan(merge, grid, depth, high, concentration, first_level)
