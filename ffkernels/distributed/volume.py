"""How many bytes each mode sends per training step, computed from the shapes (payload, not protocol overhead)."""
from __future__ import annotations

from typing import Sequence

from .pipeline import partition_layers

_INT64 = 8


def communication_per_step(dims: Sequence[int], batch_size: int, mode: str, world_size: int, *, micro_batches: int = 1,
                           element_size: int = 4, bias: bool = True, balance=None) -> dict:
    """Bytes sent per FF step of an FFNet ``dims`` = [in, w_1, ..., w_L] on ``world_size`` ranks.

    - "data": each layer all-reduces one buffer of K*N (+N bias) gradient elements plus the loss and row count,
      in at least fp32 (``element_size`` 2 counts as 4); a ring all-reduce makes every rank send 2(w-1)/w of it.
      Independent of the batch size.
    - "pipeline": every stage but the last sends h_pos and h_neg (batch_size x the width of its last layer, in
      the net's dtype) plus a header and a status (3 int64). Independent of the layer sizes except the cut widths;
      micro-batches split the same bytes into more messages.

    Returns {"per_rank": the most any one rank sends, "total": summed over the ranks, "messages": per rank at most}.
    """
    if mode not in ("data", "pipeline"):
        raise ValueError(f"ffkernels: mode must be 'data' or 'pipeline', got {mode!r}")
    if world_size < 1 or batch_size < 1 or micro_batches < 1:
        raise ValueError("ffkernels: world_size, batch_size and micro_batches must be positive")
    if world_size == 1:
        return {"per_rank": 0, "total": 0, "messages": 0}
    if mode == "data":
        elem = max(element_size, 4)
        buffer = sum(k * n + (n if bias else 0) + 2 for k, n in zip(dims[:-1], dims[1:])) * elem
        per_rank = 2 * (world_size - 1) * buffer // world_size
        return {"per_rank": per_rank, "total": per_rank * world_size, "messages": len(dims) - 1}
    stages = partition_layers(dims, world_size, balance)
    sent = [2 * batch_size * dims[r.stop] * element_size + 3 * _INT64 for r in stages[:-1]]
    return {"per_rank": max(sent), "total": sum(sent), "messages": 2 + 2 * min(micro_batches, batch_size)}
