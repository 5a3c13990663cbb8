"""What every method's ops share: tensor descriptors for the compiled core, the cached token orders it builds,
and the launcher registry keyed by ``(op, backend)``."""
