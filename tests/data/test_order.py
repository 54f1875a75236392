"""ItemOrder: the global stream of items, its sharding over data-parallel ranks, and a resumable, layout-free state."""

from types import SimpleNamespace

import numpy as np
import pytest

from ratplus_titan.data.order import ItemOrder, order_config


def reference_stream(n: int, order: str, seed: int, epochs: int) -> list[int]:
    """The documented stream: epoch e is PCG64([seed, e])'s permutation (or 0..n-1), epochs concatenated."""
    per_epoch = [
        np.arange(n) if order == "file" else np.random.Generator(np.random.PCG64([seed, e])).permutation(n)
        for e in range(epochs)
    ]
    return [int(i) for items in per_epoch for i in items]


def read(orders: list[ItemOrder], steps: int) -> list[int]:
    """``steps`` items from each rank, in step (as a trainer reads), laid out by global position."""
    out = []
    for _ in range(steps):
        out.extend(o.next_item() for o in orders)  # rank r's k-th item is global position k * W + r
    return out


def ranks(n: int, world: int, order: str = "shuffled", seed: int = 0) -> list[ItemOrder]:
    return [ItemOrder(n, r, world, order, seed) for r in range(world)]


@pytest.mark.parametrize("order", ["shuffled", "file"])
@pytest.mark.parametrize(("n", "world"), [(1, 1), (37, 1), (36, 4), (37, 4), (5, 3)])
def test_ranks_read_the_stream_and_every_epoch_is_a_permutation(n, world, order):
    seed = int(np.random.default_rng(n * world).integers(0, 2**31))
    epochs = 4
    steps = epochs * n // world
    got = read(ranks(n, world, order, seed), steps)
    expected = reference_stream(n, order, seed, epochs + 1)[: steps * world]
    assert got == expected
    for e in range(len(got) // n):  # each whole epoch visits every item exactly once
        assert sorted(got[e * n : (e + 1) * n]) == list(range(n))


def test_ranks_never_share_an_item_within_an_epoch():
    n, world = 103, 4
    orders = ranks(n, world, seed=7)
    seen = [set() for _ in range(3)]  # items read in each epoch, by any rank
    for _ in range(3 * n // world):
        for o in orders:
            epoch = o._next // n  # the epoch of the position this rank reads now
            item = o.next_item()
            assert item not in seen[epoch]
            seen[epoch].add(item)


def test_epochs_and_seeds_give_different_orders_and_depend_only_on_seed_and_epoch():
    n = 1000
    a, b = ItemOrder(n, seed=0), ItemOrder(n, seed=1)
    assert not np.array_equal(a.epoch_order(0), b.epoch_order(0))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), np.arange(n))
    fresh = ItemOrder(n, 2, 3, seed=0)  # another rank and world size, nothing read yet
    read([a], 2500)  # a is in epoch 2 now
    for e in range(3):
        assert np.array_equal(a.epoch_order(e), fresh.epoch_order(e))


@pytest.mark.parametrize(("world", "resumed_world"), [(2, 2), (2, 1), (1, 3), (4, 2)])
def test_resume_equals_the_uninterrupted_stream_under_any_data_parallel_degree(world, resumed_world):
    n, seed = 53, 11
    uninterrupted = read(ranks(n, world, seed=seed), 70)
    first = ranks(n, world, seed=seed)
    before = read(first, 30)
    state = first[0].state_dict()
    assert all(o.state_dict() == state for o in first)  # layout-free: every rank saves the same
    assert state["epoch"] * n + state["position"] == 30 * world
    resumed = ranks(n, resumed_world, seed=seed)
    for o in resumed:
        o.load_state_dict(state)
    after = read(resumed, 40 * world // resumed_world + 1)
    assert (before + after)[: len(uninterrupted)] == uninterrupted


def test_resume_from_a_position_not_divisible_by_the_new_degree():
    n = 20
    first = ranks(n, 1, seed=3)
    read(first, 7)
    resumed = ranks(n, 3, seed=3)
    for o in resumed:
        o.load_state_dict(first[0].state_dict())
    assert read(resumed, 10) == reference_stream(n, "shuffled", 3, 3)[7:37]


def test_finite_pass_reads_epoch_zero_from_the_start_in_equal_shares():
    n, world = 23, 4
    orders = ranks(n, world, "file")
    read(orders, 9)  # wherever the state is, a finite pass starts at position 0
    for _ in range(2):  # and each pass reads the same items
        shares = [list(o.items(infinite=False)) for o in orders]
        assert shares == [list(range(r, 20, world)) for r in range(world)]


def test_state_of_another_order_seed_or_data_is_refused():
    state = ItemOrder(10, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"ratplus\.data_seed = 1's order, this run has 2: resume with"):
        ItemOrder(10, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"ratplus\.data_order = 'shuffled', this run has 'file'"):
        ItemOrder(10, order="file").load_state_dict(state)
    with pytest.raises(ValueError, match=r"over 10 items, this run's data has 11"):
        ItemOrder(11, seed=1).load_state_dict(state)
    file_state = {**ItemOrder(10, order="file").state_dict(), "seed": 5, "items": 9}
    ItemOrder(10, order="file", seed=0).load_state_dict(file_state)  # file order: the seed is unused


@pytest.mark.parametrize(
    ("order", "seed", "message"),
    [
        ("random", 0, r"ratplus\.data_order = 'random' is not supported; use one of 'shuffled', 'file'"),
        ("Shuffled", 0, r"ratplus\.data_order = 'Shuffled'"),
        ("file", -1, r"ratplus\.data_seed = -1 must be an integer >= 0"),
        ("file", True, r"ratplus\.data_seed = True must be"),
    ],
)
def test_config_values_are_checked(order, seed, message):
    job = SimpleNamespace(ratplus=SimpleNamespace(data_order=order, data_seed=seed))
    with pytest.raises(ValueError, match=message):
        order_config(job)


def test_config_defaults_without_a_ratplus_section():
    assert order_config(SimpleNamespace()) == ("shuffled", 0)
