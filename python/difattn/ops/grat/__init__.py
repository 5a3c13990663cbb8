"""GRAT: image tokens in groups share one key set (the groups within ``reach`` on every axis, or the group's row
and column bands); text queries see every valid key and every query sees the valid text. It runs on the block
engine over a group-major plan in which every image block pair is fully on or off."""

from .method import grat_on_blocks

__all__ = ["grat_on_blocks"]
