"""CLEAR: each image query attends the image keys in a disc of radius r around it (frames within the temporal
radius), plus every text key; text queries attend everything.

On CPU (Rust) CLEAR has its own disc kernels (:mod:`.disc_op`): each 4×4 tile of queries attends exactly the key
ranges of its discs, read in place from the raster order. On the GPU (Triton) it runs on the block engine over a
tiled plan of discs (full blocks inside a disc, masked blocks on its rim); :mod:`.method` holds both.
"""

from .method import clear_on_blocks, clear_on_discs, computed_pairs_on_discs

__all__ = ["clear_on_blocks", "clear_on_discs", "computed_pairs_on_discs"]
