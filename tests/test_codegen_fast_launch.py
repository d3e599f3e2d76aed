"""codegen/triton/fast_launch.py: compiled kernels launched without Triton's per-call dispatch.

The specialization key and the argument order are checked on any machine (a subprocess
without the interpreter, so triton.jit makes real JITFunctions); the launches themselves need
a GPU, where the fast path must hit and give the same numbers as Triton's own launch path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = textwrap.dedent("""
    import json, os, types
    os.environ.pop("TRITON_INTERPRET", None)
    import torch, triton, triton.language as tl
    from meshweave.codegen.triton.fast_launch import FastLaunch, install

    @triton.jit
    def k(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = 3):
        pass

    fl = FastLaunch(k)
    x = torch.zeros(64, dtype=torch.float16)
    kw = {"BLOCK": 128}
    out = {
        "aligned_vs_offset": fl.key((x, x, 7, 2.0), kw) != fl.key((x, x[1:], 7, 2.0), kw),
        "dtype": fl.key((x, x, 7, 2.0), kw) != fl.key((x.float(), x, 7, 2.0), kw),
        "same_ints_same": fl.key((x, x, 32, 2.0), kw) == fl.key((x, x[:], 32, 2.0), kw),
        "ints_by_value": fl.key((x, x, 32, 2.0), kw) != fl.key((x, x, 48, 2.0), kw),
        "one_differs": fl.key((x, x, 1, 2.0), kw) != fl.key((x, x, 3, 2.0), kw),
        "i64_differs": fl.key((x, x, 3, 2.0), kw) != fl.key((x, x, 2**33 + 3, 2.0), kw),
        "float_value_free": fl.key((x, x, 3, 2.0), kw) == fl.key((x, x, 3, 5.0), kw),
        "constexpr_differs": fl.key((x, x, 3, 2.0), kw) != fl.key((x, x, 3, 2.0), {"BLOCK": 64}),
        "tail": list(fl._tail(4, {"BLOCK": 128, "num_warps": 4})),
        "tail_override": list(fl._tail(4, {"BLOCK": 64, "FLAG": 5})),
    }
    try:
        fl._tail(3, {"BLOCK": 128})
    except TypeError as e:
        out["missing"] = str(e)
    m = types.ModuleType("generated")
    m.k, m.n = k, 3
    out["installed"] = [install(m), type(m.k).__name__, install(m), m.k.fn is k]
    print(json.dumps(out))
""")


def test_specialization_key_and_argument_order(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    probe = tmp_path / "probe.py"  # triton.jit reads the kernel's source from its file
    probe.write_text(PROBE)
    proc = subprocess.run([sys.executable, str(probe)], check=False, capture_output=True,
                          text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("aligned_vs_offset", "dtype", "same_ints_same", "ints_by_value", "one_differs",
                 "i64_differs", "float_value_free", "constexpr_differs"):
        assert out[name], f"{name}: {out}"
    assert out["tail"] == [128, 3]  # BLOCK from the keywords, FLAG's default; num_warps is not
    assert out["tail_override"] == [64, 5]
    assert "no value for parameter 'scale'" in out["missing"]
    assert out["installed"] == [1, "FastLaunch", 1, True]  # wrapped once, idempotent


@pytest.mark.skipif(not torch.cuda.is_available(), reason="launches need a GPU")
def test_fast_launch_hits_and_matches_triton_launches(monkeypatch, tmp_path):
    from meshweave.codegen.triton.fast_launch import FastLaunch
    from meshweave.models import build_model

    import meshweave
    from meshweave import CompileOptions

    model, (ids,) = build_model("gpt-tiny", device="cuda", batch=2, seq=8)
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("MESHWEAVE_FAST_LAUNCH", flag)
        monkeypatch.setenv("MESHWEAVE_CACHE_DIR", str(tmp_path / flag))
        cm = meshweave.compile(model, (ids,), options=CompileOptions(backend="triton"))
        first = cm(ids)
        outs[flag] = (first, cm(ids), cm(ids))
        module = sys.modules[cm._runner.call.__module__]
        wrapped = [v for v in vars(module).values() if isinstance(v, FastLaunch)]
        if flag == "0":
            assert not wrapped
        else:
            assert wrapped and sum(k.hits for k in wrapped) > 0, [
                (k, k.hits, k.misses) for k in wrapped]
    for a, b in zip(outs["0"], outs["1"]):
        torch.testing.assert_close(b, a, rtol=0, atol=0,
                                   msg="pytest tests/test_codegen_fast_launch.py")
    torch.testing.assert_close(outs["1"][2], model(ids), rtol=1e-4, atol=1e-4)


def _samples():
    """Arguments of every kind a generated module passes, at the edges Triton specializes on."""
    base = torch.zeros(64, dtype=torch.float32)
    tensors = [base, base[1:], base[4:], base.half(), base.half()[8:], base.half()[3:],
               torch.zeros(8, dtype=torch.bool), torch.zeros(8, dtype=torch.int64)[1:],
               torch.nn.Parameter(torch.zeros(4))]
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, -17, 2**31 - 16, 2**31 - 1, 2**31, 2**32,
            -2**31, -2**31 - 16, 2**63 - 16, 2**63, 2**64 - 16]
    return tensors + ints + [0.0, 1.0, 2.5, True, False, None]


def test_key_is_at_least_as_fine_as_tritons_specialization():
    """Two arguments FastLaunch.key puts together Triton must specialize the same way, or a
    launch would reuse a kernel compiled for another alignment, width or constant."""
    from meshweave.codegen.triton.fast_launch import FastLaunch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    class _Fn:  # FastLaunch reads only the kernel's Python signature from `fn.fn`
        @staticmethod
        def fn(x):
            pass

    fl = FastLaunch(_Fn())
    samples = _samples()
    ours = [fl.key((a,), {}) for a in samples]
    triton = [native_specialize_impl(BaseBackend, a, False, True, True) for a in samples]
    for i, a in enumerate(samples):
        for j, b in enumerate(samples):
            if ours[i] == ours[j]:
                assert triton[i] == triton[j], (
                    f"FastLaunch.key merges {a!r} and {b!r}, which Triton specializes as "
                    f"{triton[i]} and {triton[j]}")
    assert len(set(ours)) >= len(set(triton))
    with pytest.raises(TypeError):  # Triton's error for an argument it cannot pass
        fl.key((object(),), {})
