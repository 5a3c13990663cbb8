"""The block attention engine: for each query block, one online softmax over a list of key blocks (full entries,
or masked entries whose element mask CLEAR's disc or GRAT's text padding defines), over a cached block plan.

:mod:`.plan` builds and caches the plans; :mod:`.op` holds the custom ops ``difattn::block_attention_fwd`` /
``_bwd``; :mod:`.launchers` the Rust and Triton launchers. CLEAR (Triton) and GRAT (every fast backend) run on it.
"""

from .op import block_attention
from .plan import BlockPlan, BlockPlanKey, BlockShape, block_plan, kernel_blocks

__all__ = ["BlockPlan", "BlockPlanKey", "BlockShape", "block_attention", "block_plan", "kernel_blocks"]
