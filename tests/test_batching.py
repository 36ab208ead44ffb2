"""core.batching: which examples each rank sees, in which order, and the eval shards."""

import random
from collections import Counter

import pytest
import torch

from core.batching import MEGA_BATCHES, eval_batches, train_batches


def all_ranks(n, batch_size, world, seed=0, epoch=0, lengths=None):
    return [train_batches(n, batch_size, world, rank, seed, epoch, lengths)
            for rank in range(world)]


def flat(per_rank):
    return [i for batches in per_rank for batch in batches for i in batch]


def padding(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n,batch_size", [(96, 8), (100, 8), (37, 4), (5, 16)])
@pytest.mark.parametrize("grouped", [False, True])
def test_every_example_exactly_once_per_epoch_across_ranks(n, batch_size, world, grouped):
    lengths = [random.Random(n).randint(1, 300) for _ in range(n)] if grouped else None
    for epoch in range(3):
        per_rank = all_ranks(n, batch_size, world, seed=7, epoch=epoch, lengths=lengths)
        seen = Counter(flat(per_rank))
        # A tail too small to give every rank an example is dropped; nothing else is.
        tail = n % (batch_size * world)
        dropped = tail if tail < world else 0
        assert max(seen.values()) == 1
        assert len(seen) == n - dropped and set(seen) <= set(range(n))
        # Every rank steps the same number of times (DDP would hang otherwise) and no
        # micro-batch is empty or over size.
        assert len({len(b) for b in per_rank}) == 1
        assert all(1 <= len(b) <= batch_size for batches in per_rank for b in batches)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_small_tail_batch(world):
    batch_size = 4
    # A tail of at least `world` examples is kept as a short batch on every rank ...
    n = batch_size * world * 3 + world
    per_rank = all_ranks(n, batch_size, world)
    assert all(len(b) == 4 for b in per_rank) and sorted(flat(per_rank)) == list(range(n))
    assert sorted(len(b) for batches in per_rank for b in batches)[:world] == [1] * world
    # ... one of fewer is dropped: those examples wait for the next epoch's shuffle.
    if world > 1:
        n = batch_size * world * 3 + world - 1
        per_rank = all_ranks(n, batch_size, world)
        assert all(len(b) == 3 for b in per_rank)
        assert len(flat(per_rank)) == n - (world - 1)
    # Fewer rows than ranks: nothing at all (plan_steps turns that into a UsageError).
    assert all_ranks(world - 1, batch_size, world) == [[]] * world


def test_order_depends_only_on_seed_and_epoch():
    first = train_batches(200, 8, 2, 1, seed=3, epoch=4)
    # Global RNG state (what a sampler would consume) does not matter.
    torch.manual_seed(123)
    torch.rand(1000)
    random.seed(5)
    assert train_batches(200, 8, 2, 1, seed=3, epoch=4) == first
    assert train_batches(200, 8, 2, 1, seed=4, epoch=4) != first
    assert train_batches(200, 8, 2, 1, seed=3, epoch=5) != first


@pytest.mark.parametrize("grouped", [False, True])
def test_order_differs_between_epochs(grouped):
    lengths = [i % 97 + 1 for i in range(500)] if grouped else None
    epochs = [train_batches(500, 10, 1, 0, 0, e, lengths) for e in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert epochs[a] != epochs[b]
            # Not just the batch order: the batches themselves are made of other examples.
            assert {tuple(sorted(x)) for x in epochs[a]} != {tuple(sorted(x)) for x in epochs[b]}
    assert flat([epochs[0]]) != list(range(500))  # shuffled at all


@pytest.mark.parametrize("world", [1, 2])
def test_length_grouping_cuts_padding(world):
    rng = random.Random(0)
    n, batch_size = 2000, 16
    lengths = [rng.randint(5, 512) for _ in range(n)]
    grouped = all_ranks(n, batch_size, world, seed=1, lengths=lengths)
    plain = all_ranks(n, batch_size, world, seed=1)
    assert sorted(flat(grouped)) == sorted(flat(plain)) == list(range(n))
    grouped_pad = sum(padding(b, lengths) for b in grouped)
    plain_pad = sum(padding(b, lengths) for b in plain)
    assert grouped_pad < 0.2 * plain_pad, (grouped_pad, plain_pad)
    # The ranks' i-th micro-batches come from one global batch, so their widths are alike
    # (each rank waits for the slowest at every step).
    if world == 2:
        widths = [[max(lengths[i] for i in b) for b in batches] for batches in grouped]
        assert sum(abs(a - b) for a, b in zip(*widths)) / len(widths[0]) < 10
    # The batches' order is still shuffled: not longest first through the whole epoch.
    first = [max(lengths[i] for i in b) for b in grouped[0]]
    assert first != sorted(first, reverse=True)


def test_length_grouping_sorts_only_inside_mega_batches():
    batch_size = 4
    window = batch_size * MEGA_BATCHES
    n = window * 3
    lengths = list(range(n))  # example i is i tokens long
    batches = train_batches(n, batch_size, 1, 0, 0, 0, lengths)
    # Longest first inside each batch, and batches are runs of near-equal lengths.
    assert all(b == sorted(b, key=lambda i: -lengths[i]) for b in batches)
    spread = [lengths[b[0]] - lengths[b[-1]] for b in batches]
    assert sum(spread) / len(spread) < n / 20


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 10, 11, 13, 64, 97])
@pytest.mark.parametrize("grouped", [False, True])
def test_eval_batches_partition_the_eval_set(n, world, grouped):
    batch_size = 4
    lengths = [(i * 37) % 50 + 1 for i in range(n)] if grouped else None
    shards = [eval_batches(n, batch_size, world, rank, lengths) for rank in range(world)]
    everything = flat(shards)
    assert sorted(everything) == list(range(n))  # each once: no duplicate padding rows
    assert all(len(b) <= batch_size for s in shards for b in s)
    # Every rank runs as many batches (sharded weights gather in every forward);
    # only a short shard's last batch may be empty.
    assert len({len(s) for s in shards}) == 1
    assert all(b or i == len(s) - 1 for s in shards for i, b in enumerate(s))
    sizes = [len(flat([s])) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    if grouped:
        for shard in shards:
            widths = [lengths[i] for b in shard for i in b]
            assert widths == sorted(widths, reverse=True)


def test_pad_batch_rounds_width_up_to_the_multiple():
    from core.collate import pad_batch
    rows = [{"input_ids": [5] * 3, "labels": [1, 2, 3]}, {"input_ids": [6] * 70, "labels": [4] * 70}]
    batch = pad_batch(rows, pad_id=0, multiple=64)
    assert batch["input_ids"].shape == (2, 128)
    assert batch["attention_mask"].sum().item() == 73
    assert (batch["labels"][0, 3:] == -100).all() and batch["labels"][0, :3].tolist() == [1, 2, 3]
    assert pad_batch(rows, pad_id=0)["input_ids"].shape == (2, 70)
