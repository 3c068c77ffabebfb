"""One linear in ONNX Runtime (CPU), in each form a W8A8 or W4A8 export could take, at MiniLM's shapes:

- ``dynamic``: ``quantize_dynamic``'s form (``DynamicQuantizeLinear`` + ``MatMulInteger`` + scale + bias,
  fused into ``DynamicQuantizeMatMul``): per-tensor uint8 activations;
- ``per-token``: qcompile's per-token chain (``Abs``/``ReduceMax``/``Div``/``Clip``, ``Div`` + unit-scale
  ``QuantizeLinear``, ``MatMulInteger``, fused into ``MatMulIntegerToFloat``, bias as a ``Sub``);
- ``nbits8/4-bB-l4``: ``MatMulNBits`` at ``accuracy_level`` 4 (activations quantized per token and block
  inside the op), 8 and 4 bits, blocks 32 / 128; ``nbits4-b128-l0``: float32 compute.

Random weights (timing only). Median µs per call, the forms interleaved, 2 intra-op threads.

    python benchmarks/onnx_linear_forms.py [--repeats 40]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)


def _const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.array(value, dtype), name)


def _model(nodes, inits, k, n):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["B", "S", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", "S", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _int8_weight(k, n):
    return [numpy_helper.from_array(RNG.integers(-127, 127, (k, n), dtype=np.int8), "B"),
            _const("BS", RNG.random(n) * 0.01)]


def dynamic(k, n):
    nodes = [helper.make_node("DynamicQuantizeLinear", ["A"], ["q", "qs", "qz"]),
             helper.make_node("MatMulInteger", ["q", "B", "qz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["qs", "BS"], ["sc"]), helper.make_node("Mul", ["accf", "sc"], ["Yb"]),
             helper.make_node("Add", ["Yb", "bias"], ["Y"])]
    return _model(nodes, _int8_weight(k, n) + [_const("bias", RNG.standard_normal(n))], k, n)


def per_token(k, n):
    nodes = [helper.make_node("Abs", ["A"], ["a"]), helper.make_node("ReduceMax", ["a", "ax"], ["am"], keepdims=1),
             helper.make_node("Div", ["am", "c127"], ["s0"]), helper.make_node("Clip", ["s0", "tiny", "top"], ["s"]),
             helper.make_node("Div", ["A", "s"], ["xs"]), helper.make_node("QuantizeLinear", ["xs", "one", "off"], ["q"]),
             helper.make_node("MatMulInteger", ["q", "B", "off"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["s", "BS"], ["sc"]), helper.make_node("Mul", ["accf", "sc"], ["Yb"]),
             helper.make_node("Sub", ["Yb", "nbias"], ["Y"])]
    consts = [_const("ax", [-1], np.int64), _const("c127", 127.0), _const("tiny", 1e-38), _const("top", 3e38),
              _const("one", 1.0), _const("off", 128, np.uint8), _const("nbias", RNG.standard_normal(n))]
    return _model(nodes, _int8_weight(k, n) + consts, k, n)


def nbits(k, n, bits, block, level):
    packed = RNG.integers(0, 255, (n, k // block, block * bits // 8), dtype=np.uint8)
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "", "", "bias"], ["Y"], domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=block, accuracy_level=level)
    return _model([node], [numpy_helper.from_array(packed, "B"), _const("S", RNG.random(n * (k // block)) * 0.01),
                           _const("bias", RNG.standard_normal(n))], k, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    print(f"onnxruntime {ort.__version__}; median µs per call")
    for k, n in ((384, 384), (384, 1536), (1536, 384)):
        forms = {"dynamic": dynamic(k, n), "per-token": per_token(k, n), "nbits8-b32-l4": nbits(k, n, 8, 32, 4),
                 "nbits8-b128-l4": nbits(k, n, 8, 128, 4), "nbits4-b128-l4": nbits(k, n, 4, 128, 4),
                 "nbits4-b128-l0": nbits(k, n, 4, 128, 0)}
        sessions = {name: ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                    for name, m in forms.items()}
        for tokens in (1, 37, 1040):
            x = {"A": RNG.standard_normal((1, tokens, k)).astype(np.float32)}
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for s in sessions.values():
                s.run(None, x)
            for _ in range(args.repeats if tokens < 1000 else max(5, args.repeats // 4)):
                for name, s in sessions.items():
                    t0 = time.perf_counter()
                    s.run(None, x)
                    times[name].append(time.perf_counter() - t0)
            print(f"K={k:5d} N={n:5d} tokens={tokens:5d}  " +
                  "  ".join(f"{name} {1e6 * statistics.median(t):7.0f}" for name, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
