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

# A tensor as Python hands it over: (data_ptr, dtype name, shape, strides in elements). The core validates
# alignment, strides and extents before reading; outputs must be contiguous.
TensorArgs = tuple[int, str, list[int], list[int]]
# Plan tensors for a kernel call: q_perm, q_offsets, k_perm, k_offsets, indptr, indices, kinds, q_coords, k_coords.
PlanArgs = tuple[TensorArgs, TensorArgs, TensorArgs, TensorArgs, TensorArgs, TensorArgs, TensorArgs, TensorArgs, TensorArgs]

def clear_plan(
    grid: GridArgs,
    radius: float,
    temporal_radius: float,
    global_tokens: int,
    q_tile: TileArgs,
    k_tile: TileArgs,
    q_block: int,
    k_block: int,
) -> tuple[dict[str, bytes], int, int]:
    """CLEAR's block plan arrays (int64 bytes; kinds and coords int32) and the element-mask thresholds
    (max_d2, max_dt)."""

def grat_plan(
    grid: GridArgs, group: TileArgs, pattern: str, reach: int, text_masked: bool, q_block: int, k_block: int
) -> dict[str, bytes]:
    """GRAT's block plan arrays."""

def block_attention_forward(
    q: TensorArgs,
    k: TensorArgs,
    v: TensorArgs,
    out: TensorArgs,
    lse: TensorArgs,
    plan: PlanArgs,
    key_valid: TensorArgs | None,
    max_d2: int,
    max_dt: int,
    scale: float,
    threads: int,
) -> None:
    """Block attention forward on CPU: writes out (B, H, N, Dv) and lse (B, H, N)."""

def block_attention_backward(
    q: TensorArgs,
    k: TensorArgs,
    v: TensorArgs,
    dout: TensorArgs,
    lse: TensorArgs,
    delta: TensorArgs,
    dq: TensorArgs,
    dk: TensorArgs,
    dv: TensorArgs,
    plan: PlanArgs,
    key_valid: TensorArgs | None,
    max_d2: int,
    max_dt: int,
    scale: float,
    threads: int,
) -> None:
    """Block attention backward on CPU: writes dq, dk, dv."""
