"""What ONNX Runtime's CPU GroupQueryAttention alone costs per decode step, by context length.

A graph of one `com.microsoft.GroupQueryAttention` node per layer, at a bundle's shapes (layers, query
and KV heads, head size), runs one decode token over past lengths of your choice, its KV buffers
bound as past and present (in place, as the runtime binds them). What it prints is the part of a
step that grows with the context and that no export of ours can change: the kernel's own time.

    python scripts/gqa_floor.py BUNDLE [--contexts 48,512,2000] [--threads 2] [--repeats 30] [--dtype float16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from autocontrast.bundle import read_manifest  # noqa: E402
from autocontrast.runtime.kv_buffer import capacity_for  # noqa: E402

DTYPES = {"float32": (TensorProto.FLOAT, np.float32), "float16": (TensorProto.FLOAT16, np.float16)}


def attention_graph(layers: int, heads: int, kv_heads: int, head_dim: int, capacity: int, dtype: int) -> bytes:
    """One GroupQueryAttention per layer reading packed q/k/v and its past buffer, all of ONNX type `dtype`."""
    width = (heads + 2 * kv_heads) * head_dim
    inputs = [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [1])]
    outputs, nodes = [], []
    for i in range(layers):
        inputs += [helper.make_tensor_value_info(f"qkv.{i}", dtype, [1, 1, width])]
        inputs += [helper.make_tensor_value_info(f"past.{i}.{k}", dtype, [1, kv_heads, capacity, head_dim])
                   for k in ("key", "value")]
        outputs += [helper.make_tensor_value_info(name, dtype, None)
                    for name in (f"out.{i}", f"present.{i}.key", f"present.{i}.value")]
        nodes.append(helper.make_node(
            "GroupQueryAttention", [f"qkv.{i}", "", "", f"past.{i}.key", f"past.{i}.value", "seqlens_k",
                                    "total_sequence_length"],
            [f"out.{i}", f"present.{i}.key", f"present.{i}.value"], domain="com.microsoft",
            num_heads=heads, kv_num_heads=kv_heads))
    graph = helper.make_graph(nodes, "gqa_floor", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="an export bundle (its manifest gives the shapes)")
    parser.add_argument("--contexts", default="48,512,2000", help="past lengths, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="of q/k/v and the KV buffers")
    args = parser.parse_args()
    manifest = read_manifest(args.bundle)
    kv = manifest.kv_cache
    heads = manifest.hidden_size // kv.head_dim
    contexts = [int(c) for c in args.contexts.split(",")]
    capacity = capacity_for(max(contexts) + 1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    onnx_type, np_type = DTYPES[args.dtype]
    session = ort.InferenceSession(attention_graph(kv.num_layers, heads, kv.num_kv_heads, kv.head_dim, capacity,
                                                   onnx_type),
                                   options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    shape = (1, kv.num_kv_heads, capacity, kv.head_dim)
    buffers = [ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(shape, np.float32).astype(np_type))
               for _ in range(2 * kv.num_layers)]
    print(f"{manifest.source_model}: {kv.num_layers} layers x GroupQueryAttention ({heads} heads, "
          f"{kv.num_kv_heads} KV heads, head size {kv.head_dim}), {args.dtype}, {args.threads} threads, "
          f"median of {args.repeats} steps")
    print("| past tokens | ms per step, all layers |\n|---|---|")
    for past in contexts:
        binding = session.io_binding()
        binding.bind_cpu_input("seqlens_k", np.array([past], np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array([past + 1], np.int32))
        for i in range(kv.num_layers):
            width = (heads + 2 * kv.num_kv_heads) * kv.head_dim
            binding.bind_cpu_input(f"qkv.{i}", rng.standard_normal((1, 1, width), np.float32).astype(np_type))
            for j, kind in enumerate(("key", "value")):
                binding.bind_ortvalue_input(f"past.{i}.{kind}", buffers[2 * i + j])
                binding.bind_ortvalue_output(f"present.{i}.{kind}", buffers[2 * i + j])
            binding.bind_output(f"out.{i}")
        session.run_with_iobinding(binding)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            session.run_with_iobinding(binding)
            times.append(time.perf_counter() - start)
        print(f"| {past} | {1000 * statistics.median(times):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
