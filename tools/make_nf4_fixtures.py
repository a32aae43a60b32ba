#!/usr/bin/env python3
"""Writes tests/fixtures/nf4.safetensors: small tensors quantized to NF4 by
bitsandbytes itself, in the layout transformers saves 4-bit checkpoints
(`<m>.weight`, `.absmax`, `.quant_map`, `.nested_absmax`, `.nested_quant_map`,
`.quant_state.bitsandbytes__nf4`), plus `expected.<m>`: bitsandbytes' own
dequantization (as float32). Cases cover float32 / bf16 / fp16 originals,
with and without double quantization, odd element counts and partial blocks.

Needs: pip install torch bitsandbytes safetensors
"""
import json
import os

import bitsandbytes.functional as F
import torch
from safetensors.torch import save_file

CASES = [
    # name, shape, dtype, double quant
    ("f32_plain", (8, 64), torch.float32, False),
    ("f32_dq_odd", (5, 37), torch.float32, True),
    ("bf16_dq", (16, 96), torch.bfloat16, True),
    ("f16_plain_partial", (3, 50), torch.float16, False),
    # more than 256 absmax blocks: two nested (double-quant) blocks
    ("f32_dq_many", (130, 128), torch.float32, True),
]


def main():
    torch.manual_seed(0)
    out = {}
    for name, shape, dtype, dq in CASES:
        w = (torch.randn(shape) * 0.05).to(dtype)
        q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        out[f"{name}.weight"] = q.contiguous()
        for k, v in st.as_dict(packed=True).items():
            out[f"{name}.weight.{k}"] = v.contiguous() if torch.is_tensor(v) else torch.tensor(list(json.dumps(v).encode()), dtype=torch.uint8)
        out[f"expected.{name}"] = F.dequantize_4bit(q, st).to(torch.float32).contiguous()
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "nf4.safetensors")
    save_file(out, path)
    print(path, os.path.getsize(path), "bytes")
    for k in sorted(out):
        print(k, tuple(out[k].shape), out[k].dtype)


if __name__ == "__main__":
    main()
