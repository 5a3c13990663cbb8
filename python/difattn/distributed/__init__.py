"""Sequence parallelism on ``torch.distributed``: every difattn method, exact across processes.

```python
import difattn.distributed as dd
q, k, v = (dd.shard(x, grid) for x in (q_full, k_full, v_full))      # this rank's tokens
out = dd.attention("clear", q, k, v, grid, radius=16)                # this rank's outputs, differentiable
full = dd.gather(out, grid)                                          # == difattn.clear_attention(q_full, ...)
```

Layout (:func:`shard`): each rank holds a contiguous stripe of image rows of every frame (frames stay whole) and a
contiguous run of the text tokens, both split like ``torch.tensor_split`` (uneven splits work: the first ranks get
one more row or token), in the grid's order (``[text][stripe]`` or ``[stripe][text]``); without a grid, a
balanced run of the sequence. Every token lives on exactly one rank.

Schemes (:func:`attention`), all exact:

- ``"ulysses"``: an all-to-all from sequence shards to head shards and back; each rank runs the public method on
  the full sequence for its heads (any method; heads split unevenly when they do not divide).
- ``"halo"`` (CLEAR, GRAT neighbours): each rank receives the image rows its queries read from the neighbouring
  stripes and all text keys/values, runs the method on its extended stripe, and merges the text queries'
  partial results by log-sum-exp.
- ``"state"`` (linear attention, DyDiLA): one all-reduce of the per-head state ``Σ kᵀv``, ``Σ k`` (fp32).

The collectives are ``torch.distributed._functional_collectives`` (gloo and NCCL, traceable); their autograd
formulas carry the gradients back. ``process_group`` is None (the default group), a ``ProcessGroup`` or a 1-D
``DeviceMesh``.
"""

from ._attention import METHODS, SCHEMES, attention
from ._shard import gather, shard

__all__ = ["shard", "gather", "attention", "METHODS", "SCHEMES"]
