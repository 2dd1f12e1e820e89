"""Row/column (CubistMerge-style) merging against a plain-Python reference on small grids."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit

from vitslim.adapters import describe
from vitslim.cait.merging import COLUMNS, ROWS, TokenMap, row_column_merge, tome_merge, unmerge
from vitslim.cait.patch import apply_token_merging, remove_token_merging
from vitslim.cait.schedule import MergeSchedule, check_schedule, plan, predicted_speedup, schedule_for_speedup
from vitslim.errors import VitslimError

PREFIX = 1


def _inputs(grid, batch=2, dim=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, PREFIX + grid[0] * grid[1], dim, generator=generator)
    keys = torch.randn(batch, PREFIX + grid[0] * grid[1], 3, generator=generator)
    return tokens, keys, TokenMap.identity(batch, grid, PREFIX, tokens.device, tokens.dtype)


def _by_hand(layout, r, direction):
    """One image's merge, written out: ``layout`` is a list of rows, each a list of tokens (dicts
    of value, key, size, cells held, anchor cell)."""
    grid = layout if direction == ROWS else [list(column) for column in zip(*layout)]
    per_line = r // len(grid)
    new_grid = []
    for line in grid:
        candidates = []
        for place in range(1, len(line), 2):
            unit = [token["key"] / token["key"].norm() for token in line]
            left = float(unit[place] @ unit[place - 1])
            right = float(unit[place] @ unit[place + 1]) if place + 1 < len(line) else float("-inf")
            candidates.append((max(left, right), place, place - 1 if left >= right else place + 1))
        merged = sorted(candidates, key=lambda item: (-item[0], item[1]))[:per_line]
        joined = {place: target for _, place, target in merged}
        new_line = []
        for place, token in enumerate(line):
            if place in joined:
                continue
            members = [token] + [line[source] for source, target in joined.items() if target == place]
            value = token["value"].clone()
            for member in members[1:]:
                value = torch.where(member["value"].abs() > value.abs(), member["value"], value)
            new_line.append({"value": value, "key": None, "size": sum(m["size"] for m in members),
                             "cells": sorted(sum((m["cells"] for m in members), [])), "anchor": token["anchor"]})
        new_grid.append(new_line)
    return new_grid if direction == ROWS else [list(row) for row in zip(*new_grid)]


def _layout_of(tokens, keys, token_map, b):
    rows, cols = token_map.layout
    held = [(token_map.source[b] == t).nonzero().flatten().tolist() for t in range(rows * cols)]
    return [[{"value": tokens[b, PREFIX + i * cols + j], "key": keys[b, PREFIX + i * cols + j], "size": float(token_map.size[b, PREFIX + i * cols + j]),
              "cells": held[i * cols + j], "anchor": token_map.position[b, i * cols + j].tolist()} for j in range(cols)] for i in range(rows)]


@pytest.mark.parametrize("grid,steps", [((4, 6), [(8, ROWS), (4, COLUMNS)]), ((5, 7), [(10, ROWS), (10, COLUMNS), (3, ROWS)]),
                                        ((6, 4), [(8, COLUMNS), (4, ROWS)])])
def test_row_column_merge_matches_a_brute_force_reference(grid, steps):
    tokens, keys, token_map = _inputs(grid)
    for r, direction in steps:
        expected = [_by_hand(_layout_of(tokens, keys, token_map, b), r, direction) for b in range(tokens.shape[0])]
        both = torch.cat([tokens, keys], dim=-1)
        merged, token_map = row_column_merge(both, keys, token_map, r, direction)
        tokens, keys = merged[..., : tokens.shape[-1]], merged[..., tokens.shape[-1]:]
        rows, cols = token_map.layout
        assert (rows, cols) == (len(expected[0]), len(expected[0][0]))
        assert tokens.shape[1] == PREFIX + rows * cols
        for b, layout in enumerate(expected):
            got = _layout_of(tokens, keys, token_map, b)
            for want_row, got_row in zip(layout, got):
                for want, have in zip(want_row, got_row):
                    assert have["cells"] == want["cells"] and have["size"] == want["size"] and have["anchor"] == want["anchor"]
                    assert torch.equal(have["value"], want["value"])
    full = unmerge(tokens, token_map)
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - PREFIX):
            for cell in (token_map.source[b] == t).nonzero().flatten().tolist():
                assert torch.equal(full[b, PREFIX + cell], tokens[b, PREFIX + t])


def test_row_column_merge_refuses_what_would_break_the_grid():
    tokens, keys, token_map = _inputs((4, 6))
    with pytest.raises(VitslimError, match="multiple of 4 up to 12, got 6"):
        row_column_merge(tokens, keys, token_map, 6, ROWS)
    with pytest.raises(VitslimError, match="multiple of 6 up to 12, got 18"):
        row_column_merge(tokens, keys, token_map, 18, COLUMNS)
    _, after_tome = tome_merge(tokens, keys, token_map, 4)
    with pytest.raises(VitslimError, match="regular grid"):
        row_column_merge(tokens[:, :-4], keys[:, :-4], after_tome, 4, ROWS)


def test_row_column_plans_alternate_directions_and_keep_whole_lines():
    schedule = plan("row-column", (16, 16), 12, 128.0)
    check_schedule(schedule, (16, 16), 1)
    directions = [level for _, _, level in schedule.steps]
    assert directions == [ROWS if i % 2 == 0 else COLUMNS for i in range(len(directions))]
    assert schedule.merged <= 128
    with pytest.raises(VitslimError, match="multiple of 16"):
        check_schedule(MergeSchedule("row-column", ((0, 20, ROWS),)), (16, 16), 1)


@pytest.mark.parametrize("dense", [False, True])
def test_row_column_merging_runs_a_real_model_in_both_modes(dense):
    model = tiny_vit(img_size=32, patch_size=4, depth=4, embed_dim=48, num_heads=3, num_classes=10)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original, features = model(images), model.forward_features(images)
    schedule = schedule_for_speedup(describe(model), "row-column", 1.4)
    assert predicted_speedup(describe(model), schedule) >= 1.4 and {level for _, _, level in schedule.steps} <= {ROWS, COLUMNS}
    apply_token_merging(model, schedule, dense=dense)
    with torch.no_grad():
        merged, merged_features = model(images), model.forward_features(images)
    assert merged.shape == original.shape and not torch.allclose(merged, original)
    assert (merged_features.shape == features.shape) == dense
    assert float((merged.softmax(-1) - original.softmax(-1)).abs().max()) < 0.5
    remove_token_merging(model)
    with torch.no_grad():
        assert torch.equal(model(images), original)
    assert MergeSchedule.from_dict(schedule.as_dict()) == schedule
