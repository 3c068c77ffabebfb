"""formats.kernel_codes: one table of the integers kernels see, for GEMM and KV formats."""

from __future__ import annotations

import os
import subprocess
import sys

from qcompile.formats import kernel_codes as kc
from qcompile.formats.kv import GROUPED_FORMATS, KV_FORMATS, PER_TOKEN_FORMATS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_weight_and_kv_vocabularies():
    assert set(kc.WEIGHT_CODES.values()) == {kc.W_INT4, kc.W_INT8, kc.W_FP4, kc.W_FP8}
    assert tuple(kc.KV_CODES) == KV_FORMATS
    assert len(set(kc.KV_CODES.values())) == len(kc.KV_CODES)
    assert kc.scale_code("int4") == kc.SCALE_FLOAT and kc.scale_code("mxfp8") == kc.SCALE_E8M0
    assert kc.scale_code("nvfp4") == kc.SCALE_E4M3
    assert [f for f in KV_FORMATS if kc.kv_grouped(kc.kv_code(f))] == list(GROUPED_FORMATS)
    assert [f for f in KV_FORMATS if kc.kv_per_token(kc.kv_code(f))] == list(PER_TOKEN_FORMATS)
    assert [f for f, c in kc.WEIGHT_CODES.items() if kc.packed_weight(c)] == [
        "int4", "fp4_e2m1", "nvfp4", "mxfp4"]
    names = [n for n in vars(kc) if n.isupper() and isinstance(getattr(kc, n), int)]
    assert all(n.startswith(("W_", "SCALE_", "KV_")) for n in names), names


def test_formats_and_runtime_import_no_triton():
    """Kernel codes, KV formats and the runtime are plain torch (triton is a Linux-only
    dependency); only kernel modules import triton."""
    code = ("import sys, qcompile.formats.kernel_codes, qcompile.formats.kv, qcompile.formats.hadamard, "
            "qcompile.runtime\nprint(any(m.split('.')[0] == 'triton' for m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
