"""Type stubs of the compiled core (Rust, PyO3). Int64 arrays cross as little-endian bytes."""

# (frames, height, width, text_tokens, text_position) with text_position "first" or "last".
GridArgs = tuple[int, int, int, int, str]
# (frames, height, width) of a tile or group.
TileArgs = tuple[int, int, int]

def tile_order(grid: GridArgs, tile: TileArgs) -> tuple[bytes, bytes]:
    """(perm, inverse) of the tile order, int64 each; text tokens stay in place."""

def tile_sizes(grid: GridArgs, tile: TileArgs) -> bytes:
    """Token count of each tile of `tile_order`, int64."""

def group_order(grid: GridArgs, group: TileArgs) -> tuple[bytes, bytes]:
    """(perm, inverse) of GRAT's group-major order, int64 each."""

def zorder(grid: GridArgs) -> tuple[bytes, bytes]:
    """(perm, inverse) of LLSA's per-frame Z-order, int64 each."""

def build_info() -> list[tuple[str, str]]:
    """How the extension was built: version, profile, target."""
