"""Token merging (ATME and the ToMe baseline): the merge math on small tensors, and the hooks on
real small models of every family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import outputs, tiny_vit
from plain_vit import PlainViT, tiny_hf_config

import vitslim
from vitslim.adapters import describe
from vitslim.adapters.replacement import copy_model, replacing_modules
from vitslim.cait.merging import (
    NEIGHBOURHOOD,
    TokenMap,
    atme_merge,
    attention_bias,
    descending_rank,
    lattice_merge,
    neighbourhood,
    sub_grid,
    tome_merge,
    unmerge,
)
from vitslim.cait.patch import (
    MergeSchedule,
    apply_token_merging,
    merge_schedule,
    remove_token_merging,
    token_map,
    token_merging,
)
from vitslim.cait.schedule import check_schedule, plan, predicted_speedup, schedule_for_speedup, tokens_per_block
from vitslim.errors import VitslimError
from vitslim.io.recipe import steps as recipe_steps

GRID = (6, 8)
PREFIX = 2
# the timm models below: 8x8 patches of 4 pixels (64 tokens to merge), 4 blocks
MERGING_GEOMETRY = dict(img_size=32, patch_size=4, depth=4, embed_dim=48, num_heads=3, num_classes=10)


def _tokens(batch=3, dim=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, PREFIX + GRID[0] * GRID[1], dim, generator=generator)
    keys = torch.randn(batch, PREFIX + GRID[0] * GRID[1], 4, generator=generator)
    return tokens, keys, TokenMap.identity(batch, GRID, PREFIX, tokens.device, tokens.dtype)


def _merge_levels(tokens, keys, token_map, merges):
    """Apply lattice merges [(r, level), ...] straight on the tensors (keys re-gathered like tokens)."""
    for r, level in merges:
        tokens_keys = torch.cat([tokens, keys], dim=-1)
        merged, token_map = lattice_merge(tokens_keys, keys, token_map, r, level)
        tokens, keys = merged[..., : tokens.shape[-1]], merged[..., tokens.shape[-1]:]
    return tokens, token_map


def _originals_held(token_map):
    """For every image, the original patch cells each current patch token holds."""
    return [[(token_map.source[b] == t).nonzero().flatten().tolist() for t in range(token_map.size.shape[1] - PREFIX)]
            for b in range(token_map.size.shape[0])]


def test_descending_rank_is_a_sort_that_keeps_equal_scores_in_place():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (5, 12), generator=generator).float()  # many ties
    scores[0] = 1.0  # all tied
    scores[1, 3] = float("-inf")  # a source with no allowed destination
    rank = descending_rank(scores)
    for row, row_rank in zip(scores.tolist(), rank.tolist()):
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))
        assert row_rank == [order.index(i) for i in range(len(row))]


@pytest.mark.parametrize("merges", [[(10, 1)], [(24, 1)], [(20, 1), (4, 1), (10, 2)], [(24, 1), (12, 2), (6, 3)]])
def test_lattice_joins_only_spatial_neighbours_and_keeps_destinations(merges):
    tokens, keys, start = _tokens()
    merged, token_map = _merge_levels(tokens, keys, start, merges)
    reach = sum(NEIGHBOURHOOD * max(sub_grid(level)) for _, level in merges)
    cols = GRID[1]
    for b, groups in enumerate(_originals_held(token_map)):
        for t, members in enumerate(groups):
            assert members, "every surviving token holds at least its own cell"
            row, col = token_map.position[b, t].tolist()
            assert row * cols + col in members, "a destination keeps its own cell"
            for cell in members:
                assert max(abs(cell // cols - row), abs(cell % cols - col)) <= reach
    top_level = merges[-1][1]
    rows_step, cols_step = sub_grid(top_level)
    on_grid = (token_map.position[..., 0] % rows_step == 0) & (token_map.position[..., 1] % cols_step == 0)
    assert int(on_grid[0].sum()) == -(-GRID[0] // rows_step) * -(-GRID[1] // cols_step)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_lattice_neighbourhood_ends_exactly_at_its_radius(level):
    radius = NEIGHBOURHOOD * max(sub_grid(level))
    grid = (radius + 3, radius + 3)
    table = neighbourhood(grid, level)
    rows_step, cols_step = sub_grid(level)
    destinations = [(row, col) for row in range(grid[0]) for col in range(grid[1]) if row % rows_step == 0 and col % cols_step == 0]
    assert table.shape == (grid[0] * grid[1], len(destinations))
    for cell in range(grid[0] * grid[1]):
        row, col = divmod(cell, grid[1])
        for column, (d_row, d_col) in enumerate(destinations):
            assert bool(table[cell, column]) == (max(abs(row - d_row), abs(col - d_col)) <= radius)
    # the first destination, (0, 0): reached at exactly the radius along rows, columns and the diagonal
    assert [bool(table[row * grid[1] + col, 0]) for row, col in [(radius, 0), (0, radius), (radius, radius), (radius + 1, 0), (0, radius + 1), (1, radius + 1)]] \
        == [True, True, True, False, False, False]


def _atme_by_hand(groups, cells, keys, r, radius):
    """ATME's merge written out for one image: ``groups`` (the original cells each current patch
    token holds), ``cells`` (where each stands) and ``keys`` in the current order."""
    count = len(groups)
    sources, destinations = list(range(0, count, 2)), list(range(1, count, 2))
    reach = int(radius * (GRID[0] * GRID[1] / count) ** 0.5)
    unit = keys / keys.norm(dim=-1, keepdim=True)
    best = []
    for s in sources:
        distance = {d: max(abs(cells[s][0] - cells[d][0]), abs(cells[s][1] - cells[d][1])) for d in destinations}
        allowed = [d for d in destinations if distance[d] <= max(reach, min(distance.values()))]
        target = max(allowed, key=lambda d: (float(unit[s] @ unit[d]), -d))
        best.append((float(unit[s] @ unit[target]), s, target))
    ranked = sorted(best, key=lambda item: (-item[0], item[1]))  # the unmerged sources follow in this order
    new_groups = {d: set(groups[d]) for d in destinations}
    for _, s, target in ranked[:r]:
        new_groups[target] |= set(groups[s])
    kept = [s for _, s, _ in ranked[r:]]
    return [new_groups[d] for d in destinations] + [set(groups[s]) for s in kept], [cells[d] for d in destinations] + [cells[s] for s in kept]


@pytest.mark.parametrize("radius", [1.0, 2.0, 100.0])
def test_atme_merges_the_most_similar_sources_into_neighbouring_destinations(radius):
    tokens, keys, token_map = _tokens()
    groups = [[[cell] for cell in range(GRID[0] * GRID[1])] for _ in range(3)]
    cells = [[divmod(cell, GRID[1]) for cell in range(GRID[0] * GRID[1])] for _ in range(3)]
    for r in (14, 9, 6):  # later merges re-merge merged tokens
        expected = [_atme_by_hand(groups[b], cells[b], keys[b, PREFIX:], r, radius) for b in range(3)]
        both = torch.cat([tokens, keys], dim=-1)
        merged, token_map = atme_merge(both, keys, token_map, r, radius)
        tokens, keys = merged[..., :5], merged[..., 5:]
        groups = [[sorted(group) for group in image[0]] for image in expected]
        cells = [image[1] for image in expected]
        assert _originals_held(token_map) == groups
        assert token_map.position.tolist() == [[list(cell) for cell in image] for image in cells]
        assert token_map.level == -1


def test_atme_keeps_merges_local_where_tome_does_not():
    """Two far-apart patches with identical keys: ToMe joins them, ATME (radius 1) does not."""
    tokens, keys, token_map = _tokens(batch=1)
    keys[0, PREFIX + 0] = keys[0, PREFIX + GRID[0] * GRID[1] - 1] = torch.tensor([1.0, 0.0, 0.0, 0.0]) * 10
    _, after_tome = tome_merge(tokens, keys, token_map, 1)
    _, after_atme = atme_merge(tokens, keys, token_map, 1, radius=1.0)
    far = GRID[0] * GRID[1] - 1
    assert after_tome.source[0, 0] == after_tome.source[0, far]
    assert after_atme.source[0, 0] != after_atme.source[0, far]
    for group in _originals_held(after_atme)[0]:
        rows, cols = {cell // GRID[1] for cell in group}, {cell % GRID[1] for cell in group}
        assert max(rows) - min(rows) <= 1 and max(cols) - min(cols) <= 1


def test_old_atme_schedules_load_as_the_lattice_reading():
    lattice = MergeSchedule("atme-lattice", ((0, 4, 1), (1, 3, 2)))
    atme = MergeSchedule("atme", ((0, 4, 1),), radius=2.5)
    assert lattice.as_dict() == {"merge": "atme-lattice", "steps": [[0, 4, 1], [1, 3, 2]]}
    assert MergeSchedule.from_dict({"merge": "atme", "steps": [[0, 4, 1], [1, 3, 2]]}) == lattice  # written by 0.2
    assert MergeSchedule.from_dict({"method": "atme", "steps": [[0, 4, 1], [1, 3, 2]]}) == lattice  # by 0.1
    assert MergeSchedule.from_dict(atme.as_dict()) == atme and atme.as_dict()["radius"] == 2.5
    with pytest.raises(VitslimError, match="radius must be positive"):
        MergeSchedule("atme", (), radius=0.0)


@pytest.mark.parametrize("method", ["atme", "atme-lattice", "tome"])
def test_merged_tokens_are_size_weighted_means_and_unmerge_puts_them_back(method):
    tokens, keys, token_map = _tokens()
    for r in (12, 7, 5):
        both = torch.cat([tokens, keys], dim=-1)
        if method == "atme-lattice":
            merged, token_map = lattice_merge(both, keys, token_map, r, 1 if token_map.size.shape[1] - PREFIX > 24 else 2)
        elif method == "atme":
            merged, token_map = atme_merge(both, keys, token_map, r, radius=1.0)
        else:
            merged, token_map = tome_merge(both, keys, token_map, r)
        tokens, keys = merged[..., :5], merged[..., 5:]
    original, _, _ = _tokens()
    assert tokens.shape[1] == PREFIX + GRID[0] * GRID[1] - 24
    torch.testing.assert_close(tokens[:, :PREFIX], original[:, :PREFIX], rtol=0, atol=0)  # prefix never merged
    torch.testing.assert_close(token_map.size[:, :PREFIX], torch.ones(3, PREFIX))
    for b, groups in enumerate(_originals_held(token_map)):
        for t, members in enumerate(groups):
            assert token_map.size[b, PREFIX + t] == len(members)
            torch.testing.assert_close(tokens[b, PREFIX + t], original[b, PREFIX + torch.tensor(members)].mean(0), rtol=1e-5, atol=1e-6)
    full = unmerge(tokens, token_map)
    assert full.shape == original.shape
    for b, groups in enumerate(_originals_held(token_map)):
        for t, members in enumerate(groups):
            for cell in members:
                assert torch.equal(full[b, PREFIX + cell], tokens[b, PREFIX + t])


def test_unmerge_of_identical_tokens_restores_the_original_map():
    tokens, keys, token_map = _tokens()
    tokens = tokens.round()  # merging equal tokens must give them back exactly
    window = torch.arange(GRID[0] * GRID[1]) // GRID[1] // 2 * 100 + torch.arange(GRID[0] * GRID[1]) % GRID[1] // 2
    tokens[:, PREFIX:] = window[None, :, None].float().expand(3, -1, 5)
    window_keys = torch.randn(1000, 4, generator=torch.Generator().manual_seed(3))
    keys[:, PREFIX:] = window_keys[window][None].expand(3, -1, -1)  # tokens of a window alike, windows apart
    both = torch.cat([tokens, keys], dim=-1)
    merged, token_map = lattice_merge(both, keys, token_map, 24, 2)
    torch.testing.assert_close(unmerge(merged[..., :5], token_map), tokens, rtol=0, atol=0)


def test_proportional_attention_equals_attention_over_copies():
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 4, 8, generator=generator) for _ in range(3))
    sizes = torch.tensor([[1.0, 3.0, 2.0, 1.0], [2.0, 1.0, 1.0, 4.0]])
    token_map = TokenMap(size=sizes, position=torch.zeros(2, 4, 2, dtype=torch.long), source=torch.zeros(2, 9, dtype=torch.long), prefix=0)
    with_bias = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias(token_map))
    for b in range(2):
        repeat = sizes[b].long()
        copies = F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1].repeat_interleave(repeat, dim=2), v[b:b + 1].repeat_interleave(repeat, dim=2))
        torch.testing.assert_close(with_bias[b:b + 1], copies, rtol=1e-5, atol=1e-6)


def test_merge_counts_beyond_what_exists_are_refused():
    tokens, keys, token_map = _tokens()
    with pytest.raises(VitslimError, match="cannot merge 25 tokens at level 1"):
        lattice_merge(tokens, keys, token_map, 25, 1)
    with pytest.raises(VitslimError, match="bipartite"):
        tome_merge(tokens, keys, token_map, 25)
    with pytest.raises(VitslimError, match="only 24 of its 48 patch tokens"):
        check_schedule(MergeSchedule("atme-lattice", ((0, 30, 1),)), GRID, PREFIX)
    with pytest.raises(VitslimError, match="must not decrease"):
        MergeSchedule("atme-lattice", ((0, 4, 2), (1, 4, 1)))
    _, coarser = lattice_merge(tokens, keys, token_map, 4, 2)
    with pytest.raises(VitslimError, match="level 1 after level 2"):
        lattice_merge(tokens[:, :-4], keys[:, :-4], coarser, 2, 1)
    _, after_tome = tome_merge(tokens, keys, token_map, 4)
    with pytest.raises(VitslimError, match="cannot follow ATME or ToMe"):
        lattice_merge(tokens[:, :-4], keys[:, :-4], after_tome, 2, 1)


def test_plan_front_loads_merges_and_moves_up_levels():
    schedule = plan("atme-lattice", (8, 8), 6, 52.0)
    # shares 5:4:3:2:1 of 52, cumulatively rounded (17.3, 31.2, 41.6, 48.5, 52); level 1 (every
    # other column) leaves block 2 one source among its 33 tokens, so it moves to level 2 (16
    # destinations), and block 3 (22 left, 6 off level 2's grid) to level 3
    assert schedule.steps == ((0, 17, 1), (1, 14, 1), (2, 11, 2), (3, 7, 3), (4, 3, 3))
    check_schedule(schedule, (8, 8), 1)
    assert plan("tome", (8, 8), 6, 0.0).steps == ()
    assert plan("atme-lattice", (8, 8), 6, 7.0).merged == 7  # cumulative rounding honours the total
    # a total beyond the caps halves every block
    assert plan("tome", (8, 8), 6, 400.0).steps == ((0, 32, 1), (1, 16, 1), (2, 8, 1), (3, 4, 1), (4, 2, 1))
    with pytest.raises(VitslimError, match="must be ≥ 0"):
        plan("tome", (8, 8), 6, -1.0)


def test_concentration_reweights_the_plan_by_a_power_of_the_blocks_that_follow():
    # weights (5-i)^2 = 25:16:9:4:1 of 55 tokens, cumulatively rounded: 25, 41, 50, 54, 55
    assert plan("tome", (8, 8), 6, 55.0, concentration=2.0).steps == ((0, 25, 1), (1, 16, 1), (2, 9, 1), (3, 4, 1), (4, 1, 1))
    # concentration 0 spreads evenly; a steep one fills block 0 up to its cap, then block 1
    assert plan("tome", (8, 8), 6, 20.0, concentration=0.0).steps == tuple((b, 4, 1) for b in range(5))
    assert plan("tome", (8, 8), 6, 48.0, concentration=16.0).steps == ((0, 32, 1), (1, 16, 1))
    assert plan("atme-lattice", (8, 8), 6, 48.0, concentration=16.0).steps == ((0, 32, 1), (1, 16, 2))
    assert plan("atme", (8, 8), 6, 48.0, concentration=16.0).steps == ((0, 32, 1), (1, 16, 1))
    assert plan("atme", (8, 8), 6, 52.0, concentration=1.0) == plan("atme", (8, 8), 6, 52.0)
    with pytest.raises(VitslimError, match="concentration must be ≥ 0"):
        plan("tome", (8, 8), 6, 10.0, concentration=-1.0)


def test_every_concentration_plans_for_the_same_flops_target():
    spec = describe(tiny_vit(name="vit_tiny_patch16_224", **(MERGING_GEOMETRY | {"depth": 6})))
    for concentration in (0.0, 1.0, 2.0, 4.0):
        schedule = schedule_for_speedup(spec, "atme", 1.6, concentration=concentration)
        assert predicted_speedup(spec, schedule) >= 1.6
    assert schedule_for_speedup(spec, "atme", 1.6, concentration=4.0).steps[0][1] > schedule_for_speedup(spec, "atme", 1.6).steps[0][1]


@pytest.mark.parametrize("total", [12.0, 40.0, 60.0, 200.0])
def test_plans_merge_at_most_half_of_a_blocks_tokens_and_atme_matches_tome(total):
    atme, lattice, tome = (plan(merge, (8, 8), 6, total) for merge in ("atme", "atme-lattice", "tome"))
    patches = 64
    for _, r, _ in lattice.steps:
        assert r <= patches // 2
        patches -= r
    assert [(b, r) for b, r, _ in lattice.steps] == [(b, r) for b, r, _ in tome.steps]
    assert atme.steps == tome.steps


def test_front_loaded_plan_reaches_a_flops_target_with_fewer_merges_than_an_even_spread():
    spec = describe(tiny_vit(name="vit_tiny_patch16_224", **(MERGING_GEOMETRY | {"depth": 6})))
    planned = schedule_for_speedup(spec, "tome", 1.5)
    even = next(schedule for per_block in range(1, 17)
                if predicted_speedup(spec, schedule := MergeSchedule("tome", tuple((b, per_block, 1) for b in range(5)))) >= 1.5)
    assert planned.merged < even.merged
    assert [r for _, r, _ in planned.steps] == sorted((r for _, r, _ in planned.steps), reverse=True)


# --- on real small models ----------------------------------------------------------------------


def _hf():
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(tiny_hf_config(image_size=32, patch_size=4)).eval()


MODELS = {
    "timm": lambda: tiny_vit(name="vit_tiny_patch16_224", **MERGING_GEOMETRY),
    "timm-registers-qknorm-layerscale": lambda: tiny_vit(name="vit_tiny_patch16_224", **MERGING_GEOMETRY, reg_tokens=4, qk_norm=True, init_values=0.1,
                                                         no_embed_class=True, class_token=True),
    "timm-distilled": lambda: tiny_vit(seed=None, name="deit_tiny_distilled_patch16_224", **(MERGING_GEOMETRY | {"depth": 3})),
    "hf": _hf,
    "torch": lambda: (torch.manual_seed(0), PlainViT(img_size=32, patch_size=4, dim=48, depth=3, heads=3, mlp_dim=96))[1].eval(),
    "torch-seq-first": lambda: (torch.manual_seed(0), PlainViT(img_size=32, patch_size=4, dim=48, depth=3, heads=3, mlp_dim=96, batch_first=False))[1].eval(),
}


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("method", ["atme", "tome"])
def test_merging_on_every_family_and_removal_restores_it(family, method):
    model = MODELS[family]()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    before = outputs(model, images)
    spec = describe(model)
    apply_token_merging(model, MergeSchedule(method, tuple((b, 0, 1) for b in range(len(spec.blocks) - 1))))
    torch.testing.assert_close(outputs(model, images), before, rtol=0, atol=0)  # r = 0 is the original exactly
    remove_token_merging(model)
    schedule = plan(method, spec.grid_size, len(spec.blocks), 12.0)
    apply_token_merging(model, schedule)
    seen = []
    last = spec.blocks[-1].module
    handle = last.register_forward_hook(lambda module, args, output: seen.append(output if spec.batch_first else output.transpose(0, 1)))
    merged = outputs(model, images)
    handle.remove()
    assert merge_schedule(model) == schedule
    assert seen[0].shape[1] == tokens_per_block(schedule, spec)[-1] == spec.num_prefix_tokens + spec.num_patches - schedule.merged
    assert torch.isfinite(merged).all() and not torch.allclose(merged, before)
    full = unmerge(seen[0], token_map(model))
    assert full.shape[1] == spec.num_prefix_tokens + spec.num_patches
    remove_token_merging(model)
    torch.testing.assert_close(outputs(model, images), before, rtol=0, atol=0)
    assert not [step for step in recipe_steps(model) if step["method"] == "merging"]


@pytest.mark.parametrize("family", ["timm", "hf", "torch"])
@pytest.mark.parametrize("dense", [False, True])
def test_a_deep_copy_of_a_merged_model_merges_on_its_own(family, dense):
    """copy.deepcopy (what users and training loops do to keep a teacher) gives a model whose
    hooks work on its own state: the same output, and running it leaves the original's token map
    untouched."""
    import copy

    model = MODELS[family]()
    spec = describe(model)
    apply_token_merging(model, plan("atme", spec.grid_size, len(spec.blocks), 12.0), dense=dense)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    expected = outputs(model, images)
    clone = copy.deepcopy(model)
    before = token_map(model)
    torch.testing.assert_close(outputs(clone, images), expected, rtol=0, atol=0)
    assert token_map(model) is before and token_map(clone) is not before
    torch.testing.assert_close(outputs(model, images[:1]), expected[:1], rtol=1e-5, atol=1e-5)


def test_merged_model_saves_and_reloads_bit_identically(tmp_path):
    model = tiny_vit(name="vit_tiny_patch16_224", **MERGING_GEOMETRY, reg_tokens=2)
    apply_token_merging(model, plan("atme", (8, 8), 4, 10.0))
    vitslim.save(model, tmp_path / "merged")
    loaded = vitslim.load_model(str(tmp_path / "merged"))
    images = torch.randn(2, 3, 32, 32)
    assert merge_schedule(loaded) == merge_schedule(model)
    assert torch.equal(outputs(loaded, images), outputs(model, images))


def test_wrong_token_count_and_double_patching_are_refused():
    model = tiny_vit(name="vit_tiny_patch16_224", **MERGING_GEOMETRY, dynamic_img_size=True)
    apply_token_merging(model, plan("atme", (8, 8), 4, 4.0))
    with pytest.raises(VitslimError, match="feed images of the model's input size"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(VitslimError, match="already merges"):
        apply_token_merging(model, plan("atme", (8, 8), 4, 4.0))
    with pytest.raises(VitslimError, match="blocks 0-3"):
        apply_token_merging(tiny_vit(name="vit_tiny_patch16_224", **MERGING_GEOMETRY), MergeSchedule("atme", ((7, 1, 1),)))


def test_schedule_for_speedup_meets_the_flops_model_and_refuses_the_impossible():
    spec = describe(tiny_vit(name="vit_tiny_patch16_224", **MERGING_GEOMETRY))
    for method in ("atme", "tome"):
        schedule = schedule_for_speedup(spec, method, 1.6)
        assert predicted_speedup(spec, schedule) >= 1.6
        gentler = plan(method, spec.grid_size, len(spec.blocks), max(0.0, schedule.merged - 1))
        assert predicted_speedup(spec, gentler) < 1.6 or gentler.merged >= schedule.merged
    with pytest.raises(VitslimError, match="beyond token merging"):
        schedule_for_speedup(spec, "tome", 50.0)


def test_token_merging_is_temporary_and_follows_replacements_and_copies():
    """The context managers: merging inside the with-block only and never in the recipe; hooks
    off and back on around a structural edit, the recorded step left as it was; a copy merges
    through hooks of its own."""
    model = tiny_vit(name="vit_tiny_patch16_224", **MERGING_GEOMETRY)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    before = outputs(model, images)
    schedule = plan("atme", (8, 8), 4, 10.0)
    with token_merging(model, schedule):
        merged = outputs(model, images)
        assert merge_schedule(model) == schedule and not recipe_steps(model)
    assert merge_schedule(model) is None and not torch.allclose(merged, before)
    torch.testing.assert_close(outputs(model, images), before, rtol=0, atol=0)
    with token_merging(model, None):  # no schedule: the model as it is
        torch.testing.assert_close(outputs(model, images), before, rtol=0, atol=0)
    apply_token_merging(model, schedule, notes={"why": "a test"})
    with replacing_modules(model):
        assert merge_schedule(model) is None
        torch.testing.assert_close(outputs(model, images), before, rtol=0, atol=0)
    torch.testing.assert_close(outputs(model, images), merged, rtol=0, atol=0)
    duplicate = copy_model(model)  # its own hooks: removing them leaves the original merging
    torch.testing.assert_close(outputs(duplicate, images), merged, rtol=0, atol=0)
    remove_token_merging(duplicate)
    torch.testing.assert_close(outputs(duplicate, images), before, rtol=0, atol=0)
    torch.testing.assert_close(outputs(model, images), merged, rtol=0, atol=0)
    assert recipe_steps(model) == [{"method": "merging", "schedule": schedule.as_dict(), "dense": False, "why": "a test"}]
    with pytest.raises(VitslimError, match="already merges tokens"), token_merging(model, schedule):
        pass


def test_atme_plans_start_at_their_first_level():
    """First level 2: every step merges into 2x2-window destinations or coarser; the default keeps level 1 first."""
    coarse = plan("atme-lattice", (8, 8), 4, 30.0, first_level=2)
    assert coarse.merged == plan("atme-lattice", (8, 8), 4, 30.0).merged == 30
    assert all(level >= 2 for _, _, level in coarse.steps) and plan("atme-lattice", (8, 8), 4, 30.0).steps[0][2] == 1
    with pytest.raises(VitslimError, match="first level"):
        plan("atme-lattice", (8, 8), 4, 30.0, first_level=0)
