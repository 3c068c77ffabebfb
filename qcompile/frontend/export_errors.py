"""torch.export failures: classified, summarized in two lines, and without torch's graph dumps.

torch prints the partial FX graph of a failed trace to stderr (twice) and logs hints at WARNING/
ERROR level; a user needs the exception type, the failing op and the line of their model that
triggered it. The full torch error stays available as the summary's ``__cause__``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import sysconfig
import traceback
from collections.abc import Iterator

import torch

_TORCH_DIR = os.path.dirname(torch.__file__)
_QCOMPILE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STDLIB = sysconfig.get_paths()["stdlib"]
_SITE = (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])
_QUIET_LOGGERS = ("torch.export", "torch._export", "torch._export.non_strict_utils", "torch.export._trace",
                  "torch.fx.experimental.symbolic_shapes")


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def is_dynamic_shape_error(e: BaseException) -> bool:
    """The failure is about the requested dynamic dimensions (a constraint violation, a dim
    spec), so tracing with fewer of them can succeed. Data-dependent guards
    (``GuardOnDataDependentSymNode``: ``if x.sum() > 0``) are about values, not shapes: a static
    trace fails the same way, so they are not retried."""
    from torch._dynamo.exc import UserError, UserErrorType
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

    for x in _chain(e):
        if isinstance(x, ConstraintViolationError):
            return True
        if isinstance(x, UserError) and (x.error_type in (UserErrorType.CONSTRAINT_VIOLATION, UserErrorType.DYNAMIC_DIM)
                                         or (x.error_type is UserErrorType.INVALID_INPUT and "dynamic_shapes" in str(x))):
            return True
    return False


def _is_user_file(path: str) -> bool:
    if path.startswith("<") or path.startswith(_TORCH_DIR) or path.startswith(_QCOMPILE_DIR):
        return False
    return not path.startswith(_STDLIB) or path.startswith(_SITE)


def user_frame(e: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame outside torch, qcompile and the standard library: the model's line."""
    for x in _chain(e):
        frames = [f for f in traceback.extract_tb(x.__traceback__) if _is_user_file(f.filename)]
        if frames:
            return frames[-1]
    return None


def failing_op(e: BaseException) -> str | None:
    """The ATen op being run when tracing failed: the exception's ``func`` (fake-tensor errors),
    else the innermost ``OpOverload.__call__`` on the traceback, else the partial graph's last op
    (a data-dependent guard fails on the value the last op produced)."""
    for x in _chain(e):
        func = getattr(x, "func", None)
        if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return str(func)
    for x in _chain(e):
        ops = [frame.f_locals.get("self") for frame, _ in traceback.walk_tb(x.__traceback__)
               if frame.f_code.co_filename.startswith(_TORCH_DIR) and frame.f_code.co_name == "__call__"]
        ops = [op for op in ops if isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))]
        if ops:
            return str(ops[-1])
    for x in _chain(e):
        graph = getattr(x, "partial_fx_graph", None)
        if graph:
            calls = re.findall(r"torch\.ops\.([\w.]+)\(", str(graph))
            if calls:
                return calls[-1]
    return None


def summarize(e: BaseException) -> str:
    """``Type in op: first message line`` and, on a second line, ``at file:line in fn: code``."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if len(first) > 240:
        first = first[:237] + "..."
    op = failing_op(e)
    head = f"{type(e).__name__}" + (f" in {op}" if op else "") + (f": {first}" if first else "")
    frame = user_frame(e)
    if frame is None:
        return head
    code = f": {frame.line.strip()}" if frame.line else ""
    return f"{head}\n  at {frame.filename}:{frame.lineno} in {frame.name}{code}"


class _Held(io.TextIOBase):
    """Collects what is written to stderr while a trace runs."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return len(s)


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Drop torch's partial-graph dumps from stderr and its export-hint logs (what they say is in
    the summary, or in the report's shape notes); everything else written to stderr is passed
    on after the attempt. ``TORCH_LOGS`` set by the user keeps torch's logs as asked."""
    held, real = _Held(), sys.stderr
    loggers = [] if os.environ.get("TORCH_LOGS") else [logging.getLogger(n) for n in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    sys.stderr = held
    dumps: set[str] = set()
    try:
        yield
    except BaseException as e:
        dumps = {str(x.partial_fx_graph) for x in _chain(e) if getattr(x, "partial_fx_graph", None)}
        raise
    finally:
        sys.stderr = real
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        skip_newline = False
        for s in held.writes:
            if s in dumps:
                skip_newline = True
                continue
            if not (skip_newline and s == "\n"):
                real.write(s)
            skip_newline = False
