"""Type stubs of the compiled core (Rust, PyO3). Int64 arrays cross as little-endian bytes."""

# (frames, height, width, text_tokens, text_position) with text_position "first" or "last".
GridArgs = tuple[int, int, int, int, str]
# (frames, height, width) of a tile or group.
TileArgs = tuple[int, int, int]

def tile_order(grid: GridArgs, tile: TileArgs) -> tuple[bytes, bytes]:
    """(perm, inverse) of the tile order, int64 each; text tokens stay in place."""

def token_blocks(grid: GridArgs, tile: TileArgs, block: int, text_block: int) -> tuple[bytes, bytes]:
    """(perm, offsets), int64 each: image tokens in tiles, text in runs of `text_block`, each cut into blocks of at
    most `block` tokens."""

def group_order(grid: GridArgs, group: TileArgs) -> tuple[bytes, bytes]:
    """(perm, inverse) of GRAT's group-major order, int64 each."""

def zorder(grid: GridArgs) -> tuple[bytes, bytes]:
    """(perm, inverse) of LLSA's per-frame Z-order, int64 each."""

def build_info() -> list[tuple[str, str]]:
    """How the extension was built: version, profile, target."""

def cpu_isa() -> tuple[str, list[str], list[str]]:
    """(level in use, levels this CPU runs, CPU vector features) of the CPU kernels; levels are "scalar", "avx2",
    "avx512" (F/BW/DQ/VL) and "avx512bf16". Raises ValueError when DIFATTN_CPU_ISA names an unknown level or one
    this CPU lacks."""

def set_cpu_isa(level: str | None) -> str:
    """Makes `level` the level of every CPU kernel in this process (None: back to DIFATTN_CPU_ISA or the best the
    CPU has); returns the level in use. Raises ValueError for an unknown level or one this CPU lacks."""

def cpu_threads() -> tuple[str, str | None]:
    """(runtime of the CPU kernels' parallel loops, file of the loaded OpenMP runtime or None): "openmp" (the
    OpenMP runtime torch loaded: its intra-op threads run the kernels' tasks) or "rayon" (the core's own pool, where
    no OpenMP runtime is loaded, in a process forked after import, or when asked for). Raises ValueError when
    DIFATTN_CPU_THREADS_RUNTIME is not auto, openmp or rayon, or asks for openmp where none is loaded."""

def set_cpu_threads(runtime: str | None) -> str:
    """Makes `runtime` ("auto", "openmp", "rayon") the runtime of the CPU kernels' loops in this process (None: back
    to DIFATTN_CPU_THREADS_RUNTIME or auto); returns the runtime in use. Raises ValueError for an unknown name, or
    "openmp" where no OpenMP runtime is loaded."""

# A tensor as Python hands it over: (data_ptr, dtype name, shape, strides in elements). The core validates
# alignment, strides and extents before reading; outputs must be contiguous.
TensorArgs = tuple[int, str, list[int], list[int]]

class BlockPlan:
    """A block plan of the attention engine (CLEAR, GRAT): built and validated once by the core, immutable, handed
    to the CPU kernels as is."""

    @staticmethod
    def clear(
        grid: GridArgs,
        radius: float,
        temporal_radius: float,
        global_tokens: int,
        q_tile: TileArgs,
        k_tile: TileArgs,
        q_block: int,
        k_block: int,
    ) -> BlockPlan:
        """CLEAR's plan: discs of `radius` within `temporal_radius` frames, `global_tokens` extra keys."""

    @staticmethod
    def grat(
        grid: GridArgs, group: TileArgs, pattern: str, reach: int, text_masked: bool, q_block: int, k_block: int
    ) -> BlockPlan:
        """GRAT's plan: `pattern` "neighbors" (within `reach`) or "criss_cross"; `text_masked` masks text keys."""

    @property
    def thresholds(self) -> tuple[int, int]:
        """(max_d2, max_dt) of the element mask; max_d2 < 0 without a disc."""

    @property
    def max_blocks(self) -> tuple[int, int]:
        """The largest query block and the largest key block."""

    @property
    def computed_pairs(self) -> int:
        """(query, key) pairs the engine computes over this plan."""

    def arrays(self) -> dict[str, bytes]:
        """The arrays as little-endian bytes (int64; kinds, t_kinds and the (t, y, x) coords int32)."""

def block_attention_forward(
    q: TensorArgs,
    k: TensorArgs,
    v: TensorArgs,
    out: TensorArgs,
    lse: TensorArgs,
    plan: BlockPlan,
    key_valid: TensorArgs | None,
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
    plan: BlockPlan,
    key_valid: TensorArgs | None,
    scale: float,
    threads: int,
) -> None:
    """Block attention backward on CPU: writes dq, dk, dv."""

def clear_forward(
    q: TensorArgs,
    k: TensorArgs,
    v: TensorArgs,
    global_kv: tuple[TensorArgs, TensorArgs] | None,
    out: TensorArgs,
    lse: TensorArgs,
    grid: GridArgs,
    radius: float,
    temporal_radius: float,
    scale: float,
    threads: int,
) -> None:
    """CLEAR forward on CPU (disc kernels, raster order): writes out (B, H, N, Dv) and lse (B, H, N)."""

def clear_backward(
    q: TensorArgs,
    k: TensorArgs,
    v: TensorArgs,
    global_kv: tuple[TensorArgs, TensorArgs] | None,
    dout: TensorArgs,
    lse: TensorArgs,
    delta: TensorArgs,
    dq: TensorArgs,
    dk: TensorArgs,
    dv: TensorArgs,
    dglobal_kv: tuple[TensorArgs, TensorArgs] | None,
    grid: GridArgs,
    radius: float,
    temporal_radius: float,
    scale: float,
    threads: int,
) -> None:
    """CLEAR backward on CPU: writes dq, dk, dv and, with global tokens, their gradients."""

def clear_computed_pairs(grid: GridArgs, global_tokens: int, radius: float, temporal_radius: float) -> int:
    """(query, key) pairs the CPU disc kernels compute (every lane of every tile)."""

# One DyDiLA side: (z, z_aux, gamma, gamma_aux, lambda), or its gradients (dz, dz_aux, dgamma, dgamma_aux, dlambda).
StreamArgs = tuple[TensorArgs, TensorArgs, TensorArgs, TensorArgs, TensorArgs]

def linear_attention_forward(
    q: TensorArgs,
    k: TensorArgs,
    v: TensorArgs,
    out: TensorArgs,
    state: TensorArgs,
    ksum: TensorArgs,
    normalize: bool,
    eps: float,
    threads: int,
) -> None:
    """Linear attention forward on CPU: writes out (B, H, N, Dv), state = (1/N) Σ kᵀv (B, H, D, Dv, fp32) and
    ksum = mean k (B, H, D, fp32)."""

def linear_attention_backward(
    q: TensorArgs,
    k: TensorArgs,
    v: TensorArgs,
    state: TensorArgs,
    ksum: TensorArgs,
    dout: TensorArgs,
    dq: TensorArgs,
    dk: TensorArgs,
    dv: TensorArgs,
    normalize: bool,
    eps: float,
    threads: int,
) -> None:
    """Linear attention backward on CPU from the forward's state and ksum: writes dq, dk, dv."""

def dydila_forward(
    q_side: StreamArgs,
    k_side: StreamArgs,
    v: TensorArgs,
    out: TensorArgs,
    state: TensorArgs,
    ksum: TensorArgs,
    normalize: bool,
    eps: float,
    threads: int,
) -> None:
    """DyDiLA forward on CPU (power maps and differential fused into the linear core): writes out, and the state
    and ksum of K̂."""

def dydila_backward(
    q_side: StreamArgs,
    k_side: StreamArgs,
    v: TensorArgs,
    state: TensorArgs,
    ksum: TensorArgs,
    dout: TensorArgs,
    dq_side: StreamArgs,
    dk_side: StreamArgs,
    dv: TensorArgs,
    normalize: bool,
    eps: float,
    threads: int,
) -> None:
    """DyDiLA backward on CPU: writes both sides' gradients (per-token ones fp32 (B, H, N)) and dv."""

def pisa_stats(
    k: TensorArgs, v: TensorArgs, q: TensorArgs | None, layout: tuple[TensorArgs, TensorArgs], key_mean: TensorArgs,
    value_mean: TensorArgs, moment_mean: TensorArgs | None, query_mean: TensorArgs | None,
    key_variance: TensorArgs | None, spread: tuple[TensorArgs, float] | None, threads: int,
) -> None:
    """PISA block statistics on CPU (f32 outputs): key_mean, value_mean and, when given, moment_mean (H̄, the mean
    moment per token), query_mean (needs q), key_variance ((1/n_j) Σ ‖k_t − k̄_j‖²) and spread = (out, c)
    (‖H_j − c·H̄‖_F; c ≠ 0 needs moment_mean). layout = (perm, offsets), int64."""

def pisa_stats_backward(
    k: TensorArgs, v: TensorArgs, layout: tuple[TensorArgs, TensorArgs], key_mean: TensorArgs, value_mean: TensorArgs,
    dkey_mean: TensorArgs | None, dvalue_mean: TensorArgs | None, dmoment_mean: TensorArgs | None, dk: TensorArgs,
    dv: TensorArgs, threads: int,
) -> None:
    """The backward of pisa_stats' means and mean moment on CPU: for token t of block j (n_j tokens), dk_t =
    dkey_mean_j / n_j + (v_t − value_mean_j) dmoment_meanᵀ / N and dv_t = dvalue_mean_j / n_j + (k_t − key_mean_j)
    dmoment_mean / N (a None gradient adds nothing); dk, dv like k, v."""

def pisa_top_blocks(score: TensorArgs, blocks: TensorArgs, threads: int) -> None:
    """PISA's routing selection on CPU: writes blocks (B, H, M, k) int64, each row's k ids of highest score
    (B, H, M, Mk) f32 in the order of a stable descending sort (ties to the lower id, NaN first)."""

def pisa_forward(
    q: TensorArgs, k: TensorArgs, v: TensorArgs, centroids: tuple[TensorArgs, TensorArgs],
    moment_mean: TensorArgs | None, out: TensorArgs, lse: TensorArgs, zeta: TensorArgs,
    plan: tuple[TensorArgs, TensorArgs, TensorArgs], scale: float, threads: int,
) -> None:
    """PISA forward on CPU: writes out, lse, zeta. centroids = (key_mean, value_mean) f32; moment_mean = H̄ (f32)
    for the hybrid order; plan = (perm, offsets, blocks flattened), int64."""

def pisa_backward(
    q: TensorArgs, k: TensorArgs, v: TensorArgs, centroids: tuple[TensorArgs, TensorArgs],
    moment_mean: TensorArgs | None, rows: tuple[TensorArgs, TensorArgs, TensorArgs, TensorArgs],
    grads: tuple[TensorArgs, TensorArgs, TensorArgs], centroid_grads: tuple[TensorArgs, TensorArgs],
    dmoment_mean: TensorArgs | None, plan: tuple[TensorArgs, TensorArgs, TensorArgs], scale: float, threads: int,
) -> None:
    """PISA backward on CPU: rows = (out, dout, lse, zeta) of the forward; writes grads = (dq, dk, dv),
    centroid_grads = (dkey_mean, dvalue_mean) and, with moment_mean, dmoment_mean (all f32 but grads)."""

# A tensor as the kernels take it: (data_ptr, dtype name, shape, strides in elements).
TensorArgs = tuple[int, str, list[int], list[int]]
# LLSA's selection as the kernels walk it: (fine (B,H,n_1,K_1) int32, pooled (B,H,n_1,E) int32,
# pb_offsets (pooled blocks + 1,) int32, pbias (P,) float32 log2 weights); see difattn.ops.llsa.plan.
LlsaPlanArgs = tuple[TensorArgs, TensorArgs, TensorArgs, TensorArgs]

def llsa_forward(q: TensorArgs, k: TensorArgs, v: TensorArgs, kp: TensorArgs, vp: TensorArgs, out: TensorArgs,
                 lse: TensorArgs, plan: LlsaPlanArgs, rows: TensorArgs | None, block_size: int, levels: int,
                 scale: float, threads: int) -> None:
    """LLSA forward on CPU: writes out (B, H, N, Dv) and lse (B, H, N) float32. rows (int64 (N,), or None for the
    identity): internal position r is row rows[r] of q, k, v and out."""

def llsa_backward(q: TensorArgs, k: TensorArgs, v: TensorArgs, kp: TensorArgs, vp: TensorArgs, dout: TensorArgs,
                  out: TensorArgs, lse: TensorArgs, dq: TensorArgs, dk: TensorArgs, dv: TensorArgs,
                  plan: LlsaPlanArgs, rows: TensorArgs | None, block_size: int, levels: int, children: bool,
                  scale: float, threads: int) -> None:
    """LLSA backward on CPU: writes dq, dk, dv (k and v through the fine and the pooled keys, whose levels pool
    their children with children=True, else the fine tokens); computes delta = rowsum(dout * out) itself. rows: as
    for llsa_forward (also for dout, dq, dk, dv)."""

def llsa_select(queries: list[TensorArgs], keys: list[TensorArgs], indices: list[TensorArgs], block_size: int,
                threads: int) -> None:
    """LLSA selection on CPU: per level (finest first) float32 pooled queries and keys, int64 ids to write."""

def llsa_zorder_pool(src: TensorArgs, perm: TensorArgs, pooled: TensorArgs, block_size: int, levels: int,
                     children: bool, threads: int) -> None:
    """LLSA pyramid on CPU: the float32 means of levels 1..levels (>= 1) of src[b, h, perm[r]] (int64 perm, rows read
    in place; each token the mean of its children with children=True, else of the fine tokens under it)
    concatenated in pooled (B, H, P, C)."""
