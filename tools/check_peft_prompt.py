#!/usr/bin/env python3
"""Independent check of soft prompts exported with `gguf-peft export --format peft`.

A prompt or prefix initialised from a text (and not trained) must act
exactly like that text placed before the input. So PEFT(base + exported
adapter) on random ids must give the logits that transformers alone gives
for `text + ids`. This checks, with PEFT and transformers only, the values
our graph computed (the text's embeddings, or every layer's keys and
values), the PEFT layout (names, shapes, config, the llama Q/K permutation
of prefix keys) and the positions real tokens take after the virtual ones.

    T="Answer in one word."
    gguf-peft finetune -m BASE.gguf -d DATA -o /tmp/p --method prefix \\
        --prompt-init text --init-text "$T" --num-virtual-tokens N --max-steps 0
    gguf-peft export --adapter /tmp/p/adapter.gguf --model BASE.gguf --out /tmp/p-peft
    tools/check_peft_prompt.py --base BASE.gguf --peft /tmp/p-peft --text "$T"

N must be the number of tokens of the text. Needs: pip install torch
transformers peft gguf sentencepiece
"""
import argparse
import json
import os


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--peft", required=True)
    ap.add_argument("--text", required=True)
    a = ap.parse_args()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(os.path.abspath(a.base))
    base = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    head = tok(a.text, return_tensors="pt").input_ids
    cfg = json.load(open(os.path.join(a.peft, "adapter_config.json")))
    n = cfg["num_virtual_tokens"]
    if head.shape[1] != n:
        raise SystemExit(f"the text has {head.shape[1]} tokens here but the adapter {n} virtual tokens")
    torch.manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (1, 24))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        joined = base(input_ids=torch.cat([head, ids], dim=1)).logits[:, n:]
        adapted = PeftModel.from_pretrained(base, a.peft)(input_ids=ids).logits
    adapted = adapted[:, -ids.shape[1]:]
    moved = (joined - plain).abs().max().item()
    diff = (adapted - joined).abs().max().item()
    scale = joined.abs().max().item()
    print(f"{cfg['peft_type']}: the text moves logits by up to {moved:.4f}")
    print(f"PEFT(base + exported adapter) vs base(text + ids): max|Δ| {diff:.3e}, ratio {diff / scale:.2e}")
    ok = diff <= 1e-3 * scale and moved > 10 * diff
    print("OK" if ok else "MISMATCH")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
