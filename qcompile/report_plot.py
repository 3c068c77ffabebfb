"""``Report.plot``: the mixed-precision picture (matplotlib, the ``plot`` extra).

Left: the error–size Pareto front (average bits per weight against the predicted output error,
each point an exact knapsack solution), every uniform assignment (all layers one option) and the
chosen point with its measured error. Right: the chosen bits per weight of each layer along the
model. Written to a temporary file beside ``path`` and renamed, so a failure writes nothing.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qcompile.report import Report


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("Report.plot needs matplotlib, which is not installed: pip install 'qcompile[plot]' "
                          "(or pip install matplotlib)") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(path: str | os.PathLike) -> Path:
    """``path`` as a PNG path whose directory exists, with matplotlib importable: checked before a
    compile so that a bad ``--plot`` fails at once. ``ValueError``/``ImportError`` naming it."""
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ValueError(f"plot path {str(out)!r}: expected a .png file")
    if not out.parent.is_dir():
        raise ValueError(f"plot path {str(out)!r}: directory {str(out.parent)!r} does not exist")
    _matplotlib()
    return out


def plot_mixed_precision(report: Report, path: str | os.PathLike) -> Path:
    """Draw ``report``'s mixed-precision front and per-layer bits into the PNG ``path``; returns it.
    ``ValueError`` when the report has no mixed-precision record (compile with ``budget=`` or
    ``quality=``) or ``path``'s directory does not exist; ``ImportError`` without matplotlib."""
    mp = report.mixed_precision
    if mp is None:
        raise ValueError("this report has no mixed-precision record to plot: compile with budget= or quality=")
    out = check_plot_path(path)
    plt = _matplotlib()
    layers = [layer for layer in report.layers if "mixed_precision" in layer.passes]
    fig, (front_ax, bits_ax) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.4]})
    try:
        if mp["front"]:
            xs, ys = zip(*mp["front"])
            front_ax.plot(xs, ys, "-o", ms=3, color="tab:blue", label="Pareto front (exact solutions)")
        for name, (x, y) in mp.get("uniform", {}).items():
            if y > 0:
                front_ax.plot([x], [y], "s", ms=4, color="tab:gray")
                front_ax.annotate(name, (x, y), fontsize=6, color="tab:gray", xytext=(3, 2), textcoords="offset points")
        cx, cy = mp["chosen"]
        front_ax.plot([cx], [cy], "*", ms=14, color="tab:red", label=f"chosen: {cx:.3f} bits, predicted {cy:.2e}")
        front_ax.plot([cx], [mp["measured_error"]], "x", ms=9, color="tab:red",
                      label=f"measured {mp['measured_error']:.2e} (cosine {mp['measured_cosine']:.5f})")
        positive = [y for y in [cy, mp["measured_error"], *(p[1] for p in mp["front"])] if y > 0]
        front_ax.set_yscale("symlog", linthresh=min(positive) if positive else 1e-6)
        front_ax.set_xlabel("average bits per weight (scales and zero points included)")
        front_ax.set_ylabel(f"predicted output error ({mp['proxy']} proxy)")
        front_ax.set_title("error–size trade-off")
        front_ax.legend(fontsize=7)
        bits = [layer.passes["mixed_precision"]["bits"] for layer in layers]
        names = [layer.passes["mixed_precision"]["option"] for layer in layers]
        palette = {n: plt.cm.tab10(i % 10) for i, n in enumerate(dict.fromkeys(names))}
        bits_ax.bar(range(len(bits)), bits, color=[palette[n] for n in names])
        bits_ax.set_xticks(range(len(bits)), [layer.path.removeprefix("model.") for layer in layers], rotation=90,
                           fontsize=5 if len(bits) > 30 else 7)
        bits_ax.set_ylabel("bits per weight")
        bits_ax.set_title(f"chosen options along the model ({len(bits)} layers)")
        handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in palette.values()]
        bits_ax.legend(handles, list(palette), fontsize=7)
        fig.tight_layout()
        fd, tmp = tempfile.mkstemp(suffix=".png", dir=out.parent, prefix=f".{out.name}.")
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=120)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)
    return out
