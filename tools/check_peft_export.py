#!/usr/bin/env python3
"""Independent check of `gguf-peft export --format peft` with PEFT itself.

Loads the base GGUF through transformers (dequantized, Q/K un-permuted by
transformers' own GGUF loader), applies the exported adapter with
PeftModel.from_pretrained, and compares the logits with those of the model
that `gguf-peft merge --type f32` wrote (also loaded by transformers). A wrong
name, shape, scale or Q/K row permutation shows up as a large difference.

    gguf-peft export --adapter A.gguf --model BASE.gguf --out /tmp/peft
    gguf-peft merge --model BASE.gguf --adapter A.gguf --type f32 --out /tmp/merged.gguf
    tools/check_peft_export.py --base BASE.gguf --peft /tmp/peft --merged /tmp/merged.gguf

Needs: pip install torch transformers peft gguf sentencepiece
"""
import argparse
import os


def load(path):
    from transformers import AutoModelForCausalLM
    import torch
    d, f = os.path.split(os.path.abspath(path))
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--peft", required=True)
    ap.add_argument("--merged", required=True)
    a = ap.parse_args()
    import torch
    from peft import PeftModel

    torch.manual_seed(0)
    base = load(a.base)
    ids = torch.randint(0, base.config.vocab_size, (1, 48))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, a.peft)(input_ids=ids).logits
        merged = load(a.merged)(input_ids=ids).logits
    moved = (adapted - plain).abs().max().item()
    diff = (adapted - merged).abs().max().item()
    scale = merged.abs().max().item()
    print(f"adapter moves logits by up to {moved:.4f}")
    print(f"PEFT(base + exported adapter) vs merged model: max|Δ| {diff:.3e}, ratio {diff / scale:.2e}")
    ok = diff <= 1e-3 * scale and moved > 10 * diff
    print("OK" if ok else "MISMATCH")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
