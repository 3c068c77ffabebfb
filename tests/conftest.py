"""Test setup: Triton kernels run under the interpreter when there is no GPU.
TRITON_INTERPRET must be set before any kernel is decorated, hence here; the interpreter's
compatibility patch (``triton_env.apply_interpreter_compat``) is applied here too, since the
tests launch kernels through internal entry points as well as the host wrappers."""

import os

try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    from qcompile.codegen import triton_env
except ImportError:  # pragma: no cover - no triton
    triton_env = None
if triton_env is not None and triton_env.interpreting():
    triton_env.apply_interpreter_compat()
if not _cuda and os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one intra-op thread per xdist worker: -n 2 on 2 cores, no oversubscription


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
