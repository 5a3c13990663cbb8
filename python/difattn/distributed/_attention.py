"""``difattn.distributed.attention``: any method on sequence shards, by the scheme that keeps it exact."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import functional
from .._checks import check_int, check_qkv, resolve_scale
from .._options import check_linear, clear_radii, grat_group, grat_text_mask
from ._comm import Comm
from ._halo import clear_wants, grat_wants, halo_attention, halo_bytes
from ._layout import Layout, balanced
from ._shard import layout_of
from ._state import dydila_state, linear_state
from ._ulysses import ulysses

METHODS = ("dense", "clear", "grat", "pisa", "llsa", "linear", "dydila")
SCHEMES = ("auto", "ulysses", "halo", "state")

_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "clear": functional.clear_attention,
    "grat": functional.grat_attention,
    "pisa": functional.pisa_attention,
    "llsa": functional.llsa_attention,
    "linear": functional.linear_attention,
    "dydila": functional.dydila_attention,
}
# Set by the scheme (the geometry) or not expressible on shards (the data-dependent selections).
_NOT_OPTIONS = frozenset({"grid", "return_blocks", "return_indices"})
_DYDILA_TOKENS = ("gamma_q", "gamma_k", "gamma_q_aux", "gamma_k_aux", "lambda_q", "lambda_k")


def _options_of(method: str) -> frozenset[str]:
    if method == "dense":
        return frozenset({"scale"})
    params = inspect.signature(_FUNCTIONS[method]).parameters
    names = {name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return frozenset(names - _NOT_OPTIONS) | ({"q_aux", "k_aux"} if method == "dydila" else frozenset())


def _check_options(method: str, options: dict[str, Any]) -> None:
    allowed = _options_of(method)
    unknown = sorted(set(options) - allowed)
    if unknown:
        hint = " (selections cannot be returned from shards)" if set(unknown) & _NOT_OPTIONS else ""
        raise TypeError(
            f"method {method!r} does not take option(s) {', '.join(unknown)} in difattn.distributed{hint}; "
            f"it accepts: {', '.join(sorted(allowed)) or 'none'}"
        )
    required = {"clear": {"radius"}, "dydila": {"q_aux", "k_aux", *_DYDILA_TOKENS}}.get(method, set())
    missing = sorted(required - set(options))
    if missing:
        raise TypeError(f"method {method!r} needs option(s) {', '.join(missing)}")


def _choose(method: str, scheme: str, layout: Layout | None, options: dict[str, Any], q, v) -> str:
    """The scheme to run; the same on every rank (it depends only on the layout, shapes and options)."""
    halo_ok = method == "clear" or (method == "grat" and options.get("pattern", "neighbors") == "neighbors")
    if scheme == "auto":
        if method in ("linear", "dydila"):
            return "state"
        if not halo_ok or layout.rows is None:
            return "ulysses"
        _, H, _, D = q.shape
        if H < layout.world:  # too few heads to split: the halo keeps them
            return "halo"
        heaviest = max(layout.count(r) for r in range(layout.world))
        through_ulysses = heaviest * H * 2 * (D + v.shape[-1]) * (layout.world - 1) // layout.world
        halo = halo_bytes(layout, _wants(method, layout, options), H, D + v.shape[-1], 1)
        return "halo" if halo <= through_ulysses else "ulysses"
    if scheme == "state" and method not in ("linear", "dydila"):
        raise ValueError(f"scheme 'state' is for 'linear' and 'dydila', not {method!r}")
    if scheme == "halo":
        if not halo_ok:
            raise ValueError(f"scheme 'halo' is for 'clear' and for 'grat' with pattern='neighbors', not {method!r}"
                             f"{' with pattern=' + repr(options.get('pattern')) if method == 'grat' else ''}")
        if layout.rows is None:
            raise ValueError("scheme 'halo' needs image row stripes; this layout has none (use 'ulysses')")
    return scheme


def _wants(method: str, layout: Layout, options: dict[str, Any]):
    if method == "clear":
        radius, _ = clear_radii(layout.grid, options["radius"], options.get("temporal_radius"))
        return clear_wants(layout, radius)
    _, gh, _ = grat_group(layout.grid, options.get("group"))
    return grat_wants(layout, gh, check_int("reach", options.get("reach", 1), minimum=0))


def attention(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Any = None,
    *,
    process_group: Any = None,
    scheme: str = "auto",
    **options: Any,
) -> torch.Tensor:
    """``method`` on this rank's shards ``q, k, v`` (from :func:`shard`); returns this rank's output shard.

    ``gather(attention(method, shard(q), shard(k), shard(v), grid, ...), grid)`` equals the single-process call
    on the full tensors, forward and backward. ``method``: ``"dense"`` (SDPA), ``"clear"``, ``"grat"``,
    ``"pisa"``, ``"llsa"``, ``"linear"``, ``"dydila"``. ``scheme``: ``"ulysses"`` (every method; needs at least
    as many heads as ranks), ``"halo"`` (CLEAR, GRAT neighbours; stripe layouts), ``"state"`` (linear, DyDiLA),
    or ``"auto"``: state for the linear methods, the halo for the local ones when it moves fewer bytes than
    Ulysses (it computes its halo rows' queries too, so on a fast interconnect Ulysses may be faster), else Ulysses. ``options``: the public function's keyword options (not ``grid``, ``return_*``);
    DyDiLA's ``q_aux``, ``k_aux`` and per-token ``gamma_*``/``lambda_*`` shards (``(B, H, n_r)``, or floats)
    as keywords; GRAT's ``text_mask`` and CLEAR's ``global_kv`` whole on every rank (their gradients on each
    rank are that rank's share: sum them over the group). The state scheme computes in torch (``backend`` is
    then unused).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(map(repr, SCHEMES))}; got {scheme!r}")
    _check_options(method, options)
    check_qkv(q, k, v)
    comm = Comm(process_group)
    layout = None
    if grid is not None or (method not in ("linear", "dydila") or scheme == "ulysses"):
        layout = _layout_for(comm, grid, q)
    return run(method, comm, layout, q, k, v, scheme, options)


def _layout_for(comm: Comm, grid: Any, q: torch.Tensor) -> Layout:
    n = q.shape[2]
    if grid is None:  # a plain sequence: the total comes from every rank's count
        counts = comm.all_gather(torch.tensor([n], device=q.device), [(1,)] * comm.world)
        layout = Layout.sequence(int(torch.cat(counts).sum()), comm.world)
    else:
        layout = layout_of(grid, comm.world)
    if n != layout.count(comm.rank):
        raise ValueError(
            f"q, k, v have {n} tokens, but this rank's shard of the {'grid' if grid is not None else 'sequence'} "
            f"holds {layout.count(comm.rank)} (pass shards made by difattn.distributed.shard)"
        )
    return layout


def run(method: str, comm: Comm, layout: Layout | None, q, k, v, scheme: str, options: dict[str, Any]) -> torch.Tensor:
    """The scheme's computation on a known layout (diffusers' context parallelism brings its own)."""
    scheme = _choose(method, scheme, layout, options, q, v)
    if scheme == "state":
        options = dict(options)
        normalize = options.pop("normalize", method == "linear")
        eps = check_linear(normalize, options.pop("eps", 1e-6))
        options.pop("backend", None)
        if method == "linear":
            return linear_state(comm, q, k, v, normalize=normalize, eps=eps)
        return dydila_state(comm, q, k, v, normalize=normalize, eps=eps, **options)
    if scheme == "halo":
        return _halo(method, comm, layout, q, k, v, options)
    return _ulysses(method, comm, layout, q, k, v, options)


def _halo(method: str, comm: Comm, layout: Layout, q, k, v, options: dict[str, Any]) -> torch.Tensor:
    fn, call = _FUNCTIONS[method], dict(options)
    if method == "grat":
        call["group"] = grat_group(layout.grid, options.get("group"))
        call["text_mask"] = grat_text_mask(options.get("text_mask"), q.shape[0], layout.grid, q.device)

    def run_extended(q_ext, k_ext, v_ext, grid_ext):
        return fn(q_ext, k_ext, v_ext, grid_ext, **call)

    return halo_attention(
        comm, layout, q, k, v, wants=_wants(method, layout, options), run=run_extended,
        scale=resolve_scale(options.get("scale"), q.shape[3]), text_mask=call.get("text_mask"),
    )


def _ulysses(method: str, comm: Comm, layout: Layout, q, k, v, options: dict[str, Any]) -> torch.Tensor:
    H = q.shape[1]
    if H < comm.world:
        raise ValueError(
            f"scheme 'ulysses' splits the heads over the ranks: q has {H} heads for {comm.world} ranks; "
            "use fewer ranks or a scheme that keeps the heads ('halo', 'state')"
        )
    h0, h1 = balanced(H, comm.world)[comm.rank]
    call = dict(options)
    tensors = {"q": q, "k": k, "v": v}
    if method == "dydila":
        tensors["q_aux"], tensors["k_aux"] = call.pop("q_aux"), call.pop("k_aux")
        for name in _DYDILA_TOKENS:
            if isinstance(call[name], torch.Tensor):
                tensors[name] = call.pop(name).unsqueeze(-1)  # (B, H, n_r) -> (B, H, n_r, 1) to travel
    if call.get("global_kv") is not None:
        call["global_kv"] = tuple(x[:, h0:h1] for x in call["global_kv"])
    names = list(tensors)

    def compute(*full: torch.Tensor) -> torch.Tensor:
        t = dict(zip(names, full))
        for name in _DYDILA_TOKENS:
            if name in t:
                call[name] = t.pop(name).squeeze(-1)
        if method == "dense":
            return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], scale=call.get("scale"))
        if method in ("clear", "grat"):
            return _FUNCTIONS[method](t["q"], t["k"], t["v"], layout.grid, **call)
        if method in ("pisa", "llsa"):
            return _FUNCTIONS[method](t["q"], t["k"], t["v"], grid=layout.grid, **call)
        if method == "dydila":
            return _FUNCTIONS[method](t["q"], t["k"], t["v"], t["q_aux"], t["k_aux"], **call)
        return _FUNCTIONS[method](t["q"], t["k"], t["v"], **call)

    return ulysses(comm, layout, [tensors[n] for n in names], compute)
