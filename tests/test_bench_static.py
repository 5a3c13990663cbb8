"""`difattn bench --static`'s readers of compiled kernels (SASS, ptxas report, occupancy), its specialisation of
launch arguments, its JSON and table, and the generated BENCHMARKS.md section. Compiling every production launch
is tier 1's ahead-of-time test (tests/test_triton_aot.py)."""

import importlib.util
import json
from pathlib import Path

import pytest

from difattn.bench import static
from difattn.cli import main

ROOT = Path(__file__).resolve().parent.parent

# Lines as cuobjdump -sass prints them: a loop from 0x0c60 to the backward branch at 0x0cb0 (6 instructions), a
# forward branch, and the trailing self-branch every kernel ends with.
SASS = """
        /*0580*/              @!P1 BRA 0x0d00 ;                                                 /* 0x0000003c00049947 */
        /*0c50*/                   MOV R1, c[0x0][0x28] ;                                       /* 0x0 */
        /*0c60*/                   LDG.E R2, desc[UR4][R4.64] ;                                 /* 0x0 */
        /*0c70*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8].tnspA.tnspB, R24 ;        /* 0x0 */
        /*0c80*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8].tnspA.tnspB, R24, gsb0 ;  /* 0x0 */
        /*0c90*/                   HMMA.16816.F32 R8, R12, R16, R8 ;                             /* 0x0 */
        /*0ca0*/                   IADD3 R0, R0, 0x1, RZ ;                                      /* 0x0 */
        /*0cb0*/               @P1 BRA 0xc60 ;                                                  /* 0x0 */
        /*0d00*/                   EXIT ;                                                       /* 0x0 */
        /*0d10*/                   BRA 0xd10;                                                   /* 0x0 */
"""


def test_sass_counts_tensor_core_instructions_and_the_longest_loop():
    assert static.sass_counts(SASS) == {"wgmma": 2, "mma_sync": 1, "loop_instructions": 6}
    assert static.sass_counts(SASS.replace("@P1 BRA 0xc60", "@P1 BRA 0xd00"))["loop_instructions"] == 0


def test_ptxas_report():
    log = ("ptxas info    : Used 255 registers, used 1 barriers, 184 bytes cumulative stack size\n"
           "ptxas info    : 0 bytes gmem\n    184 bytes stack frame, 184 bytes spill stores, 176 bytes spill loads\n")
    assert static._ptxas_report(log) == (255, 184)
    with pytest.raises(RuntimeError, match="no register report"):
        static._ptxas_report("ptxas info: nothing")


@pytest.mark.parametrize("arch, regs, smem, warps, expect", [
    (90, 255, 50 * 1024, 4, 8 / 64),  # 8192 registers a warp: 8 warps fit, two blocks of 4
    (90, 96, 41472, 4, 20 / 64),  # registers allow 21 warps, shared memory 5 blocks
    (90, 32, 4096, 4, 1.0),  # the 64-warp limit
    (80, 64, 100 * 1024, 8, 8 / 64),  # one block's shared memory fits an A100's 164 KB once
])
def test_occupancy(arch, regs, smem, warps, expect):
    assert static.occupancy(arch, regs, smem, warps) == pytest.approx(expect)


@pytest.mark.interpreter
def test_launch_spec_applies_the_jit_specialisation():
    """Integers equal to 1 become constants, 16-aligned pointers and 16-divisible integers get divisibility hints,
    ``do_not_specialize`` arguments neither, constexprs and launch options are kept."""
    torch = pytest.importorskip("torch")
    triton = pytest.importorskip("triton")
    import triton.language as tl

    def kernel(x_ptr, stride, n, m, BLOCK: tl.constexpr):
        pass

    interpreted = triton.jit(do_not_specialize=["m"])(kernel)
    if not hasattr(interpreted, "kwargs"):
        pytest.skip("records launches under TRITON_INTERPRET=1")
    x = torch.zeros(64)
    spec = static.launch_spec(interpreted, (x[1:], 1, 32, 48), {"BLOCK": 16, "num_warps": 8})
    assert spec["signature"] == {"x_ptr": "*fp32", "stride": "constexpr", "n": "i32", "m": "i32",
                                 "BLOCK": "constexpr"}
    assert spec["constexprs"] == {"stride": 1, "BLOCK": 16}
    assert spec["divisible"] == ["n"]  # x[1:] is 4 bytes past an aligned start; m is not specialised
    assert spec["options"] == {"num_warps": 8}
    assert static.launch_spec(interpreted, (x, 2, 17, 48), {"BLOCK": 16})["divisible"] == ["x_ptr"]


def _record(**values):
    base = dict(zip(static.COLUMNS, ["_k", "clear", "fwd", 64, "float16", 90, 128, 0, 4096, 0.25, 8, 0, 300]))
    return {**base, **values, "num_warps": 4, "num_stages": 2, "constexprs": {}}


def test_bench_static_writes_json_and_table(tmp_path, capsys, monkeypatch):
    calls = []

    def fake(head_dims, archs):
        calls.append((head_dims, archs))
        return {"triton": "3.9.0", "ptxas": "Cuda compilation tools", "records": [_record(), _record(D=128)],
                "failures": []}

    monkeypatch.setattr(static, "production_records", fake)
    path = tmp_path / "static.json"
    assert main(["bench", "--static", "--arch", "80", "--head-dim", "128", "--json", str(path)]) == 0
    assert calls == [((128,), (80,))]
    data = json.loads(path.read_text())
    assert data["kind"] == "static" and data["columns"] == list(static.COLUMNS) and len(data["records"]) == 2
    out = capsys.readouterr().out
    assert "spill_bytes" in out and "25%" in out

    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    md = report.benchmarks_md([(path, data)])
    assert "## Compiled kernels (`difattn bench --static`)" in md
    assert "| _k | clear | fwd | 128 | float16 | 90 | 128 | 0 | 4096 | 25% | 8 | 0 | 300 |" in md


def test_bench_static_fails_on_a_failed_compile(tmp_path, monkeypatch):
    monkeypatch.setattr(static, "production_records", lambda head_dims, archs: {
        "triton": "3.9.0", "ptxas": None, "records": [], "failures": ["_k sm_90: CompilationError"]})
    assert main(["bench", "--static", "--json", str(tmp_path / "s.json")]) == 1
