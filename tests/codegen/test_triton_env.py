"""qcompile.codegen.triton_env: the interpreter patch is applied only where the interpreter runs,
never as a side effect of importing the package or its kernels."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from qcompile.codegen import triton_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fresh(code: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_imports_leave_the_interpreter_unpatched():
    code = ("import qcompile, qcompile.codegen.gemm, qcompile.codegen.attention, qcompile.runtime\n"
            "from qcompile.codegen.triton_env import interpreter_compat_active\n"
            "print(interpreter_compat_active())")
    assert _fresh(code) == "False"


def test_force_triton_and_launches_apply_the_patch():
    code = ("from qcompile.codegen import gemm, triton_env\n"
            "a = triton_env.interpreter_compat_active()\n"
            "with gemm.force_triton():\n"
            "    b = triton_env.interpreter_compat_active()\n"
            "print(a, b)")
    assert _fresh(code) == "False True"
    code = ("from qcompile.codegen import triton_env\n"
            "triton_env.before_launch()\n"
            "print(triton_env.interpreter_compat_active())")
    assert _fresh(code) == "True"


def test_num_sms_default_off_cuda():
    cpu = torch.device("cpu")
    assert triton_env.num_sms(cpu) == triton_env.NUM_SMS_DEFAULT
    assert triton_env.num_sms(cpu, default=1) == 1
