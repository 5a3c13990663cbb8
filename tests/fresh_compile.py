"""Compile checks meant to run in a fresh process (``tests/test_compile.py`` starts one per check).

A custom op that already ran eagerly in the process can hide a compile bug (its caches are warm, its plans
built), so every check compiles and calls before anything runs uncompiled, then compares with eager.

    python tests/fresh_compile.py functional BACKEND
    python tests/fresh_compile.py diffusers FAMILY METHOD BACKEND [--eager-first] [--dense-steps] [--train]
        [--resolutions]

On success the last line of stdout is a JSON object with the dynamo frame counts after each call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch
import torch._dynamo.testing

import difattn

OPTIONS = {
    "clear": {"radius": 2.5},
    "grat": {"group": (2, 2)},
    "pisa": {"density": 0.5, "block_size": 4},
    "llsa": {"block_size": 4, "topk": 2},
}


def _functional_methods(grid: difattn.TokenGrid) -> dict:
    def dydila(q, k, v):
        return difattn.dydila_attention(q, k, v, q.flip(2), k.flip(2), gamma_q=2.0, gamma_k=3.0, gamma_q_aux=1.5,
                                        gamma_k_aux=2.5, lambda_q=0.5, lambda_k=0.25)

    return {
        "clear": lambda q, k, v: difattn.clear_attention(q, k, v, grid, radius=2.5),
        "grat": lambda q, k, v: difattn.grat_attention(q, k, v, grid, group=(2, 2)),
        "pisa": lambda q, k, v: difattn.pisa_attention(q, k, v, density=0.5, block_size=16, grid=grid),
        "llsa": lambda q, k, v: difattn.llsa_attention(q, k, v, block_size=4, topk=2, grid=grid),
        "linear": lambda q, k, v: difattn.linear_attention(q.relu(), k.relu(), v),
        "dydila": dydila,
    }


def _forward_backward(fn, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.square().sum().backward()
    return [out.detach()] + [x.grad for x in leaves]


def functional(backend: str) -> dict:
    """Every method compiled with ``fullgraph=True`` (forward and backward) before any op runs eagerly."""
    grid = difattn.TokenGrid(8, 8, text_tokens=3)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, 2, grid.num_tokens, 16, generator=generator) for _ in range(3)]
    methods = _functional_methods(grid)
    compiled = {name: _forward_backward(torch.compile(fn, fullgraph=True, backend=backend), inputs)
                for name, fn in methods.items()}
    for name, fn in methods.items():
        for got, want in zip(compiled[name], _forward_backward(fn, inputs)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    return {"methods": sorted(methods)}


def _calls(args, make) -> list[dict]:
    """``(kwargs, expect_recompile)`` per call: new data never recompiles; a new resolution or prompt length may."""
    video = "frames" in make.__code__.co_varnames
    base = {"frames": 2} if video else {}
    sizes = [(4, 4, 0), (4, 4, 1)]
    if args.resolutions:
        sizes += [(6, 4, 2), (6, 4, 3), (6, 4, "text")]
    if args.dense_steps:
        timesteps = [900.0, 900.0, 500.0, 100.0, 900.0]
        return [dict(base, timestep=t, seed=i) | {"_h": 4, "_w": 4} for i, t in enumerate(timesteps)]
    calls = []
    for h, w, seed in sizes:
        kwargs = dict(base, seed=3 if seed == "text" else seed, _h=h, _w=w)
        if seed == "text":
            kwargs["text"] = 5
        calls.append(kwargs)
    return calls


def diffusers(args) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import diffusers_tiny

    import difattn.diffusers as dd

    model, make = diffusers_tiny.FAMILIES[args.family]()
    options = dict(OPTIONS[args.method])
    if args.dense_steps:
        options["dense_steps"] = 1
    if args.train:
        options["down_factor"] = 2
    calls = _calls(args, make)
    stock = []
    if args.dense_steps:
        stock = [_output(model, make, call, train=False) for call in calls]
    dd.apply(model, args.method, **options)
    if args.eager_first:
        _output(model, make, calls[0], train=args.train)
    counter = torch._dynamo.testing.CompileCounterWithBackend(args.backend)
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    frames = []
    for i, call in enumerate(calls):
        with warnings.catch_warnings(record=True) as caught:  # e.g. dynamo's warning on an lru_cache'd function
            warnings.simplefilter("always")
            got = _output(compiled, make, call, train=args.train, model=model)
        ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                if "difattn" in w.filename or "lru_cache" in str(w.message)]
        assert not ours, f"call {i} warned while compiled: {ours}"
        frames.append(counter.frame_count)
        want = _output(model, make, call, train=args.train)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=lambda m: f"call {i}: {m}")
        if stock:  # step 0 of each generation runs dense: the stock output; the other steps do not
            gap = float((got[0] - stock[i][0]).abs().max())
            assert (gap < 1e-5) == (i in (0, 1, 4)), f"call {i}: |difattn - stock| = {gap}"
    return {"frames": frames}


def _output(fn, make, call: dict, *, train: bool, model=None) -> list[torch.Tensor]:
    """The transformer's output (and, with ``train``, every parameter gradient of a squared-sum loss)."""
    model = fn if model is None else model
    kwargs = make(call["_h"], call["_w"], **{k: v for k, v in call.items() if not k.startswith("_")})
    if not train:
        with torch.no_grad():
            return [fn(**kwargs, return_dict=False)[0]]
    model.zero_grad()
    out = fn(**kwargs, return_dict=False)[0]
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert any("spatial_weight" in n for n, p in model.named_parameters() if p.grad is not None)
    return [out.detach()] + grads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("functional").add_argument("backend")
    d = sub.add_parser("diffusers")
    d.add_argument("family")
    d.add_argument("method", choices=sorted(OPTIONS))
    d.add_argument("backend")
    d.add_argument("--eager-first", action="store_true", help="run the model eagerly once before compiling")
    d.add_argument("--dense-steps", action="store_true", help="dense_steps=1 over two generations")
    d.add_argument("--train", action="store_true", help="CLEAR global tokens, compare parameter gradients")
    d.add_argument("--resolutions", action="store_true", help="also a new resolution and a new prompt length")
    args = parser.parse_args(argv)
    result = diffusers(args) if args.what == "diffusers" else functional(args.backend)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
