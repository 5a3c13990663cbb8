"""``torch.compile(fullgraph=True)`` of the functional API, the models and diffusers transformers after ``apply``.

Each check runs in a fresh process (``tests/fresh_compile.py``) that compiles before any op runs eagerly: a warm
op (plans already built, caches filled) once hid GRAT's data-dependent plan sizes from the tests. Dynamo's frame
counter checks that new data never recompiles and a new resolution or prompt length recompiles at most once.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="the diffusers compile checks need diffusers (the 'test' extra)")

SCRIPT = Path(__file__).with_name("fresh_compile.py")
SWEEP = {  # every family the tests build, one method each (FLUX and Wan get every method), all four covered
    "flux2": "clear", "chroma": "pisa", "sd3": "llsa", "qwen_image": "grat", "cogview4": "clear",
    "auraflow": "pisa", "hunyuan_image": "llsa", "dit": "grat", "pixart": "clear", "skyreels_v2": "pisa",
    "chronoedit": "llsa", "wan_vace": "grat", "allegro": "clear", "ltx_video": "pisa", "hunyuan_video": "llsa",
    "mochi": "grat", "cogvideox": "clear",
}
# Stock HunyuanVideo 1.5 does not compile with fullgraph=True (data-dependent branching in diffusers' own code).
NOT_CHECKED = {"hunyuan_video15"}


def fresh(*args: str, timeout: int = 900) -> dict:
    """Run one check of ``fresh_compile.py`` in a new interpreter; its JSON result."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), *sys.path])))
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_functional_compiles_fresh(backend):
    """CLEAR, GRAT, PISA, LLSA, linear and DyDiLA: forward and backward compiled whole, no op warm (GRAT's plan
    once failed with 'Could not extract specialized integer from data-dependent expression u0')."""
    assert fresh("functional", backend)["methods"] == ["clear", "dydila", "grat", "linear", "llsa", "pisa"]


@needs_diffusers
@pytest.mark.parametrize("family, method", [("flux", "grat"), ("wan", "clear")])
def test_diffusers_compile_recompiles_only_on_new_shapes(family, method):
    """FLUX (image grid in img_ids' values: once GuardOnDataDependentSymNode) and Wan (once an untraceable
    ContextVar / enum call): fullgraph after apply, equal to eager, no recompile for new latents."""
    # Calls: (4x4, data 0), (4x4, data 1), (6x4, data 2), (6x4, data 3), (6x4, a longer prompt). Frames compiled
    # after each: at most 2 per shape (the forward pre-hook and the forward are separate frames).
    frames = fresh("diffusers", family, method, "aot_eager", "--resolutions")["frames"]
    assert frames[0] <= 2 and frames[1] == frames[0] and frames[3] == frames[2], f"new data recompiled: {frames}"
    assert frames[2] - frames[1] <= 2 and frames[4] - frames[3] <= 2, f"a new shape compiled too often: {frames}"


@needs_diffusers
@pytest.mark.parametrize("family, method", [("flux", "pisa"), ("wan", "llsa")])
def test_diffusers_compiles_data_dependent_methods(family, method):
    """PISA and LLSA select blocks from the data: the op runs them eagerly, so the graph holds no selection."""
    fresh("diffusers", family, method, "aot_eager")


@needs_diffusers
@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("method", ["clear", "grat", "pisa", "llsa"])
def test_diffusers_compiles_every_method(family, method):
    fresh("diffusers", family, method, "aot_eager")


@needs_diffusers
def test_diffusers_compile_after_an_eager_call():
    """Compiling after the model ran eagerly (warm caches, loggers already used) traces too."""
    fresh("diffusers", "wan", "grat", "aot_eager", "--eager-first", "--resolutions")


@needs_diffusers
def test_diffusers_compile_dense_steps_follow_the_timestep():
    """dense_steps under compile: the step is counted when the graph runs, so step 0 of each generation is the
    stock output and the others are not, with one graph."""
    frames = fresh("diffusers", "wan", "clear", "aot_eager", "--dense-steps")["frames"]
    assert len(set(frames)) == 1, frames


@needs_diffusers
def test_diffusers_compile_trains():
    """Backward through the compiled transformer (CLEAR with its learnable global-token weights): every parameter
    gradient equals eager's."""
    fresh("diffusers", "flux", "clear", "aot_eager", "--train")


@needs_diffusers
def test_every_family_has_a_compile_check():
    sys.path.insert(0, str(SCRIPT.parent))
    from diffusers_tiny import FAMILIES

    assert set(FAMILIES) == set(SWEEP) | {"flux", "wan"} | NOT_CHECKED


@needs_diffusers
@pytest.mark.slow
@pytest.mark.parametrize("family, method", sorted(SWEEP.items()))
def test_diffusers_family_compiles(family, method):
    """Every family the tests build (where the stock model compiles) compiles with fullgraph after apply."""
    frames = fresh("diffusers", family, method, "aot_eager")["frames"]
    assert frames[1] == frames[0], frames


@needs_diffusers
@pytest.mark.slow
@pytest.mark.parametrize("family, method", [("flux", "pisa"), ("wan", "llsa")])
def test_diffusers_compiles_with_inductor(family, method):
    fresh("diffusers", family, method, "inductor")
