"""Ops: ``torch.library`` custom ops (with fake and autograd registrations) over the compiled kernels, one folder
per method (``block/`` is the shared block engine, ``linear/`` also serves DyDiLA) on a small shared base
(``_base/``: tensor descriptors, token orders, the launcher registry). The backend table
(:mod:`difattn.backends`) is the only place a backend is chosen; ops receive its name and look their launcher up.
"""
