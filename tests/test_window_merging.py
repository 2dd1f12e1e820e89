"""Window merging (ALGM's local stage): the merge against a brute-force reference on small grids,
its refusals, and the window schedules' planning and validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit

from vitslim.adapters import describe
from vitslim.cait.merging import TokenMap, destination_cells, lattice_merge, sub_grid, tome_merge, unmerge, window_merge
from vitslim.cait.schedule import (
    WINDOW_BLOCK,
    MergeSchedule,
    check_schedule,
    plan,
    predicted_speedup,
    schedule_for_speedup,
    strongest_schedule,
)
from vitslim.errors import VitslimError

BATCH, DIM, KEY_DIM = 3, 5, 4
# 8x8 patches of 4 pixels, 6 blocks: 16 whole 2x2 windows
SPEC_GEOMETRY = dict(img_size=32, patch_size=4, depth=6, embed_dim=48, num_heads=3, num_classes=10)


def _inputs(grid, prefix, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(BATCH, prefix + grid[0] * grid[1], DIM, generator=generator)
    keys = torch.randn(BATCH, prefix + grid[0] * grid[1], KEY_DIM, generator=generator)
    return tokens, keys, TokenMap.identity(BATCH, grid, prefix, tokens.device, tokens.dtype)


def _groups(token_map):
    """Per image, the original cells each current patch token holds, in token order."""
    current = token_map.size.shape[1] - token_map.prefix
    return [[(token_map.source[b] == t).nonzero().flatten().tolist() for t in range(current)] for b in range(token_map.size.shape[0])]


def _reference_groups(token_map, keys, level, windows):
    """Brute force, per image: the groups of original cells after merging the ``windows`` whole
    windows of ``level`` whose members' keys are least unlike their top-left member's at worst.
    Members are the current tokens standing on the previous level's destinations (every cell
    before any merge) inside a window lying wholly in the grid."""
    (rows, cols), grid, prefix = sub_grid(level), token_map.grid, token_map.prefix
    held_rows, held_cols = sub_grid(token_map.level) if token_map.level else (1, 1)
    expected = []
    for b, groups in enumerate(_groups(token_map)):
        at = {tuple(token_map.position[b, t].tolist()): t for t in range(len(groups))
              if token_map.position[b, t, 0] % held_rows == 0 and token_map.position[b, t, 1] % held_cols == 0}
        scored = []
        for top in range(0, grid[0] - rows + 1, rows):
            for left in range(0, grid[1] - cols + 1, cols):
                members = [at[(row, col)] for row in range(top, top + rows) for col in range(left, left + cols) if (row, col) in at]
                similarity = [F.cosine_similarity(keys[b, prefix + t], keys[b, prefix + members[0]], dim=0) for t in members[1:]]
                scored.append((min(similarity).item(), members))
        merged = [members for _, members in sorted(scored, key=lambda item: -item[0])[:windows]]
        joined = {t for members in merged for t in members}
        expected.append(sorted([sorted(cell for t in members for cell in groups[t]) for members in merged]
                               + [groups[t] for t in range(len(groups)) if t not in joined]))
    return expected


def _window_merge_both(tokens, keys, token_map, r, level, method="window"):
    """One merge of tokens and keys together (the keys travel like any feature)."""
    both = torch.cat([tokens, keys], dim=-1)
    merge = window_merge if method == "window" else lattice_merge
    merged, token_map = merge(both, keys, token_map, r, level)
    return merged[..., :DIM], merged[..., DIM:], token_map


def _whole_windows(grid, level):
    rows, cols = sub_grid(level)
    return (grid[0] // rows) * (grid[1] // cols)


# (method, level, windows merged; -1: all whole windows) per step; ATME steps give r itself
STEPS = {
    "1x2 windows": [("window", 1, 3)],
    "2x2 windows": [("window", 2, 2)],
    "2x4 windows": [("window", 3, 1)],
    "every 2x2 window, then a 4x4": [("window", 2, -1), ("window", 4, 1)],
    "some 2x2 windows, then a 4x4": [("window", 2, 2), ("window", 4, 1)],
    "after the lattice at level 1": [("atme", 1, 5), ("window", 2, 3)],
}


@pytest.mark.parametrize("grid", [(4, 4), (4, 6), (5, 7)])
@pytest.mark.parametrize("prefix", [1, 5])
@pytest.mark.parametrize("steps", sorted(STEPS))
def test_window_merge_matches_a_brute_force_reference(grid, prefix, steps):
    tokens, keys, token_map = _inputs(grid, prefix)
    original = tokens.clone()
    for method, level, count in STEPS[steps]:
        if method == "atme":
            tokens, keys, token_map = _window_merge_both(tokens, keys, token_map, count, level, "atme")
            continue
        windows = _whole_windows(grid, level) if count < 0 else count
        held_rows, held_cols = sub_grid(token_map.level) if token_map.level else (1, 1)
        rows, cols = sub_grid(level)
        r = windows * ((rows // held_rows) * (cols // held_cols) - 1)
        expected = _reference_groups(token_map, keys, level, windows)
        before = tokens.shape[1]
        tokens, keys, token_map = _window_merge_both(tokens, keys, token_map, r, level)
        assert tokens.shape[1] == before - r
        assert [sorted(groups) for groups in _groups(token_map)] == expected
    full = unmerge(tokens, token_map)
    torch.testing.assert_close(tokens[:, :prefix], original[:, :prefix], rtol=0, atol=0)  # the prefix never merges
    torch.testing.assert_close(token_map.size[:, :prefix], torch.ones(BATCH, prefix), rtol=0, atol=0)
    destinations = destination_cells(grid, level)
    for b, groups in enumerate(_groups(token_map)):
        # the level's destinations lead, in grid order, as ATME's and the next merge expect
        assert [tuple(cell) for cell in token_map.position[b, : len(destinations)].tolist()] == destinations
        for t, cells in enumerate(groups):
            assert token_map.size[b, prefix + t] == len(cells)
            row, col = token_map.position[b, t].tolist()
            assert row * grid[1] + col in cells, "a token stands on a cell of its own (a merged window on its destination's)"
            torch.testing.assert_close(tokens[b, prefix + t], original[b, prefix + torch.tensor(cells)].mean(0), rtol=1e-5, atol=1e-6)
            for cell in cells:
                assert torch.equal(full[b, prefix + cell], tokens[b, prefix + t])
            if len(cells) == 1:
                assert torch.equal(full[b, prefix + cells[0]], original[b, prefix + cells[0]])


def test_windows_of_alike_keys_are_preferred_and_ties_never_split_a_window():
    grid, prefix = (4, 6), 1
    tokens, keys, token_map = _inputs(grid, prefix)
    cell_window = torch.arange(24) // 6 // 2 * 3 + torch.arange(24) % 6 // 2  # the 2x2 window of every cell
    alike = [1, 5]
    for window in alike:  # keys of one direction (any length): similarity 1 within the window
        cells = (cell_window == window).nonzero().flatten()
        keys[:, prefix + cells] = keys[:, prefix + cells[:1]] * torch.tensor([1.0, 2.0, 0.5, 3.0])[None, :, None]
    _, _, merged = _window_merge_both(tokens, keys, token_map, 3 * len(alike), 2)
    for groups in _groups(merged):
        assert sorted(cells for cells in groups if len(cells) > 1) == [cell_window.eq(w).nonzero().flatten().tolist() for w in alike]
    # every window alike: any two may merge, but always whole
    keys[:, prefix:] = 1.0
    _, _, merged = _window_merge_both(tokens, keys, token_map, 6, 2)
    for groups in _groups(merged):
        joined = [cells for cells in groups if len(cells) > 1]
        assert len(joined) == 2 and all(cell_window[cells].unique().numel() == 1 and len(cells) == 4 for cells in joined)


def test_merges_that_would_split_a_window_or_lose_its_destinations_are_refused():
    grid, prefix = (4, 6), 1
    tokens, keys, token_map = _inputs(grid, prefix)
    with pytest.raises(VitslimError, match=r"whole windows of 3 sources each: r must be a multiple of 3 \(0, 3, 6, \.\.\.\), got 4"):
        window_merge(tokens, keys, token_map, 4, 2)
    with pytest.raises(VitslimError, match="holds 6 whole windows of 3 sources"):
        window_merge(tokens, keys, token_map, 21, 2)
    tokens_after, keys_after, coarser = _window_merge_both(tokens, keys, token_map, 6, 2)
    with pytest.raises(VitslimError, match="every window holds a single token"):
        window_merge(tokens_after, keys_after, coarser, 3, 2)
    with pytest.raises(VitslimError, match="level 1 after level 2"):
        window_merge(tokens_after, keys_after, coarser, 2, 1)
    _, after_tome = tome_merge(tokens, keys, token_map, 4)
    with pytest.raises(VitslimError, match="cannot follow ATME or ToMe"):
        window_merge(tokens[:, :-4], keys[:, :-4], after_tome, 3, 2)
    assert window_merge(tokens, keys, token_map, 0, 2) == (tokens, token_map)
    with pytest.raises(VitslimError, match="block 1: .* multiple of 3"):
        MergeSchedule("window", ((1, 4, 2),))
    with pytest.raises(VitslimError, match="block 3: .* multiple of 3"):  # 4x4 windows of the 2x2 windows' destinations
        MergeSchedule("window", ((1, 12, 2), (3, 4, 4)))
    with pytest.raises(VitslimError, match="window levels must not decrease"):
        MergeSchedule("window", ((1, 12, 2), (3, 2, 1)))
    with pytest.raises(VitslimError, match="only 18 of its 24 patch tokens can merge at level 2"):
        check_schedule(MergeSchedule("window", ((1, 21, 2),)), grid, prefix)
    check_schedule(MergeSchedule("window", ((0, 0, 1), (1, 18, 2), (3, 3, 4))), (4, 8), prefix)


def test_window_plans_merge_whole_2x2_windows_once_after_an_early_block():
    assert plan("window", (8, 8), 6, 10.0).steps == ((WINDOW_BLOCK, 12, 2),)  # 4 windows reach 10 tokens
    assert plan("window", (8, 8), 6, 12.0) == plan("window", (8, 8), 6, 12.0, concentration=4.0)
    assert plan("window", (8, 8), 6, 400.0).steps == ((WINDOW_BLOCK, 48, 2),)  # every one of the 16 windows
    assert plan("window", (5, 7), 6, 400.0).steps == ((WINDOW_BLOCK, 18, 2),)  # windows cut by the edge never merge
    assert plan("window", (8, 8), 6, 0.0).steps == ()
    assert plan("window", (8, 8), WINDOW_BLOCK + 1, 10.0).steps == ()  # no block left to profit


def test_window_schedule_for_a_speedup_meets_its_prediction_and_passes_the_checks():
    spec = describe(tiny_vit(name="vit_tiny_patch16_224", **SPEC_GEOMETRY))
    schedule = schedule_for_speedup(spec, "window", 1.5)
    ((block, r, level),) = schedule.steps
    assert (block, level) == (WINDOW_BLOCK, 2) and r % 3 == 0
    assert predicted_speedup(spec, schedule) >= 1.5
    assert predicted_speedup(spec, MergeSchedule("window", ((block, r - 3, level),))) < 1.5  # the gentlest that does
    check_schedule(schedule, spec.grid_size, spec.num_prefix_tokens)
    assert schedule_for_speedup(spec, "window", 1.5, concentration=4.0) == schedule
    strongest = strongest_schedule(spec, "window")
    assert strongest.steps == ((WINDOW_BLOCK, 48, 2),)
    with pytest.raises(VitslimError, match="beyond token merging"):
        schedule_for_speedup(spec, "window", predicted_speedup(spec, strongest) * 1.01)


def test_window_schedules_round_trip_through_their_dict():
    schedule = MergeSchedule("window", ((1, 12, 2), (3, 3, 4)))
    assert MergeSchedule.from_dict(schedule.as_dict()) == schedule
    assert schedule.as_dict() == {"merge": "window", "steps": [[1, 12, 2], [3, 3, 4]]}


class _TwoWindowMerges(torch.nn.Module):
    """2x2 windows, then 4x4 windows of their destinations, on a 6x8 grid; the full map and sizes out."""

    def forward(self, tokens, keys):
        token_map = TokenMap.identity(tokens.shape[0], (6, 8), 1, tokens.device, tokens.dtype)
        tokens, keys, token_map = _window_merge_both(tokens, keys, token_map, 15, 2)
        tokens, _, token_map = _window_merge_both(tokens, keys, token_map, 3, 4)
        return unmerge(tokens, token_map), token_map.size


def test_window_merging_traces_for_export_with_any_batch():
    generator = torch.Generator().manual_seed(4)
    example = (torch.randn(2, 49, DIM, generator=generator), torch.randn(2, 49, KEY_DIM, generator=generator))
    batch = torch.export.Dim("batch")
    program = torch.export.export(_TwoWindowMerges(), example, dynamic_shapes=({0: batch}, {0: batch}))
    images = (torch.randn(5, 49, DIM, generator=generator), torch.randn(5, 49, KEY_DIM, generator=generator))
    for exported, eager in zip(program.module()(*images), _TwoWindowMerges()(*images)):
        torch.testing.assert_close(exported, eager, rtol=0, atol=0)
