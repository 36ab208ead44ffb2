"""Which examples go into which micro-batch, on which rank, in which epoch.

The order is a pure function of (seed, epoch), never of hidden sampler state. That
is what makes a resumed run replay exactly the batches the interrupted one would
have seen: it recomputes the epoch's order and skips the micro-batches already done.
"""

import torch

# Examples are sorted by length only inside windows of this many global batches,
# so batches are of similar lengths while the epoch's order stays random.
MEGA_BATCHES = 50


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def train_batches(n: int, batch_size: int, world: int, rank: int, seed: int, epoch: int,
                  lengths: list[int] | None = None) -> list[list[int]]:
    """This rank's micro-batches for one epoch.

    A global batch holds `batch_size * world` examples; rank r takes every
    world-th of them starting at r. With `lengths`, examples are grouped by length
    (sorted inside shuffled mega-batches, then the batches themselves shuffled), so
    little compute goes to padding. A final global batch too small to give every
    rank an example is dropped: a rank with nothing to do would stall the others.
    """
    order = epoch_order(n, seed, epoch)
    global_size = batch_size * world
    if lengths is not None:
        window = global_size * MEGA_BATCHES
        order = [i for start in range(0, n, window)
                 for i in sorted(order[start:start + window], key=lambda i: -lengths[i])]
    batches = [order[start:start + global_size] for start in range(0, n, global_size)]
    if lengths is not None:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
    return [batch[rank::world] for batch in batches if len(batch) >= world]


def eval_batches(n: int, batch_size: int, world: int, rank: int,
                 lengths: list[int] | None = None) -> list[list[int]]:
    """This rank's share of the eval set: every example exactly once across ranks.

    Unlike a distributed sampler, nothing is padded with duplicates, so metrics
    gathered from all ranks count each example once. Sorting the shard by length
    keeps padding low; results carry their indices, so order does not matter.
    Every rank gets as many batches as rank 0 (whose shard is the largest); a rank
    with fewer rows gets empty batches at the end, on which it runs a filler forward
    pass (`filler`): sharded weights (--fsdp) are gathered inside each forward, so
    all ranks must take part in every one.
    """
    shard = list(range(rank, n, world))
    if lengths is not None:
        shard.sort(key=lambda i: -lengths[i])
    most = -(-len(range(0, n, world)) // batch_size)
    return [shard[start:start + batch_size] for start in range(0, most * batch_size, batch_size)]


def filler(idx: list[int]) -> list[int]:
    """The rows an eval batch runs: its own, or row 0 for an empty one (results dropped)."""
    return idx or [0]
