"""Options and their costs: bytes equal the formats library's, latency follows the measured
efficiencies, the extras hook adds its bytes, and every cited source exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from qcompile.formats import QuantSpec, quantize
from qcompile.passes import mixed_precision_options as opts
from qcompile.passes.mixed_precision_cost import (
    EFFICIENCY,
    FLOAT_BYTES,
    efficiency,
    option_bytes,
    option_seconds,
)
from qcompile.passes.mixed_precision_options import PrecisionOption, candidate_options, parse_option
from qcompile.targets import get_target

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("spec", ["int8", "int4-g128-asym", "int4-g32-asym", "int3-g64-asym", "int2-g32-asym",
                                  "nvfp4", "mxfp4", "fp8_e4m3"])
@pytest.mark.parametrize("shape", [(48, 96), (40, 200)])
def test_bytes_equal_the_quantized_tensors(spec, shape):
    w = torch.randn(*shape)
    option = PrecisionOption(QuantSpec.parse(spec))
    assert option_bytes(option, *shape) == quantize(w, option.weight).nbytes()


def test_sixteen_bit_costs_two_bytes_a_weight():
    assert option_bytes(PrecisionOption(None), 10, 30) == 10 * 30 * FLOAT_BYTES


def test_decode_latency_orders_formats_by_their_measured_kernels():
    hopper = get_target("hopper")
    t = {s: option_seconds(parse_option(s), 14336, 4096, hopper, 1) for s in ("int4-g128-asym", "int8", None)}
    assert t["int4-g128-asym"] < t["int8"] < t[None]
    # int4 decode: the floor over the measured efficiency (0.53), not the floor itself.
    floor = (option_bytes(parse_option("int4-g128-asym"), 14336, 4096) + 2 * (14336 + 4096)) / 3350e9
    assert t["int4-g128-asym"] == pytest.approx(floor / 0.53)


def test_cpu_formats_without_a_packed_kernel_cost_the_float_gemm():
    cpu = get_target("cpu")
    int3, float16 = parse_option("int3-g32-asym"), parse_option(None)
    assert efficiency(cpu, int3, 1).as_float
    assert option_seconds(int3, 512, 512, cpu, 1) == option_seconds(float16, 512, 512, cpu, 1)
    # Above 16 tokens the CPU runs int4 as a float32 GEMM on the dequantized weight too.
    int4 = parse_option("int4-g32-asym")
    assert option_seconds(int4, 512, 512, cpu, 64) == option_seconds(float16, 512, 512, cpu, 64)
    assert option_seconds(int4, 512, 512, cpu, 1) < option_seconds(float16, 512, 512, cpu, 1)


def test_every_cited_benchmark_file_exists_and_unmeasured_rows_say_so():
    for (kernels, kind), eff in EFFICIENCY.items():
        for cited in re.findall(r"docs/[\w./-]+\.md", eff.source):
            assert (ROOT / cited).is_file(), (kernels, kind, cited)
        assert "docs/benchmarks/" in eff.source or "assumption" in eff.source, (kernels, kind)


def test_extras_hook_adds_bytes_and_unregistered_keys_are_named(monkeypatch):
    monkeypatch.setattr(opts, "EXTRAS", {})
    split = PrecisionOption(QuantSpec.parse("int4-g32-asym"), extras={"outlier_split": {"method": "sparse"}})
    with pytest.raises(ValueError, match=r"no handler registered for extras key\(s\) \['outlier_split'\]"):
        option_bytes(split, 64, 64)
    opts.register_extras("outlier_split", nbytes=lambda option, rows, k: 100)
    plain = PrecisionOption(split.weight)
    assert option_bytes(split, 64, 64) == option_bytes(plain, 64, 64) + 100
    assert split.name == "int4-g32-asym [outlier_split]"


def test_candidates_parse_and_duplicates_are_named():
    act = QuantSpec.parse("int8-pc-dynamic")
    options = candidate_options(None, act, "gptq")
    assert [o.name for o in options][-1] == "16-bit" and options[-1].activation is None
    assert options[0].activation == act and options[0].method == "gptq"
    assert parse_option({"weight": "int4-g64-asym", "activation": None}).activation is None
    with pytest.raises(ValueError, match=r"repeat \['int8-pc'\]"):
        candidate_options(["int8", "int8-pc"])
    with pytest.raises(ValueError, match=r"unknown keys \['bits'\]"):
        parse_option({"weight": "int8", "bits": 8})
    with pytest.raises(ValueError, match=r"candidate weight 'int9'"):
        parse_option("int9")
