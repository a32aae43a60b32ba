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

N must be the number of tokens of the text.

With a classification adapter (P-tuning v2 on labeled data), `--classify
DATA.jsonl --nll X` instead loads the base as a sequence classifier, applies
the exported SEQ_CLS adapter (deep prompts + score head) with PEFT and
compares the mean NLL of the labeled records with X, the figure
`gguf-peft eval --adapter A.gguf -d DATA.jsonl` printed.

Needs: pip install torch transformers peft gguf sentencepiece
"""
import argparse
import json
import os


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--peft", required=True)
    ap.add_argument("--text")
    ap.add_argument("--classify", help="labeled JSONL records")
    ap.add_argument("--nll", type=float, help="our mean NLL on --classify")
    a = ap.parse_args()
    if a.classify:
        return classify(a)
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


def classify(a):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    d, f = os.path.split(os.path.abspath(a.base))
    labels = json.load(open(os.path.join(a.peft, "labels.json")))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    base = AutoModelForSequenceClassification.from_pretrained(
        d, gguf_file=f, torch_dtype=torch.float32, num_labels=len(labels),
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    model = PeftModel.from_pretrained(base, a.peft)
    nll, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for line in open(a.classify):
            if not line.strip():
                continue
            r = json.loads(line)
            ids = tok(r["text"], return_tensors="pt").input_ids
            try:
                logits = model(input_ids=ids).logits
            except ValueError:
                # PEFT's SEQ_CLS prefix path cannot see `past_key_values`
                # in some transformers versions' signatures; run its own
                # prompt through the classifier directly instead.
                pkv = model.get_prompt(1)
                mask = torch.ones(1, pkv.get_seq_length() + ids.shape[1], dtype=torch.long)
                logits = model.base_model(input_ids=ids, past_key_values=pkv, attention_mask=mask).logits
            logp = torch.log_softmax(logits[0], -1)
            k = labels.index(str(r["label"]))
            nll -= logp[k].item()
            correct += int(logp.argmax().item() == k)
            n += 1
    nll /= n
    print(f"PEFT SEQ_CLS: {n} examples, accuracy {correct / n:.4f}, mean NLL {nll:.6f}")
    if a.nll is not None:
        diff = abs(nll - a.nll)
        print(f"ours: mean NLL {a.nll:.6f}; |Δ| {diff:.2e}")
        ok = diff <= 1e-3 * max(1.0, abs(a.nll))
        print("OK" if ok else "MISMATCH")
        raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
