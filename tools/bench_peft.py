#!/usr/bin/env python3
"""Reference benchmark: PEFT + transformers + torch (CPU, fp32) on the same
GGUF (loaded and dequantized through transformers' gguf_file= support), the
same method config and token counts as `gguf-peft bench`, printing the same
figures. Run both in one sitting to compare:

    tools/bench_peft.py --model MODEL.gguf --threads 2
    gguf-peft bench --model MODEL.gguf --threads 2

`--method prompt|prefix --num-virtual-tokens N` benchmarks prompt tuning or
prefix tuning instead of LoRA (`gguf-peft bench --method ...` likewise).
`--bf16` runs the passes under torch's CPU autocast to bfloat16 (the
weights' products in bf16, master weights and optimizer in fp32): the
counterpart of `gguf-peft bench --base-compute bf16`.

Needs: pip install torch transformers peft gguf sentencepiece
"""
import argparse
import json
import os
import resource
import statistics
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="GGUF file")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--method", default="lora", choices=["lora", "prompt", "prefix"])
    ap.add_argument("--num-virtual-tokens", type=int, default=20)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--bf16", action="store_true", help="autocast the passes to bfloat16")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    import contextlib

    import torch
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    d, f = os.path.split(os.path.abspath(a.model))
    base = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    if a.method == "prompt":
        cfg = PromptTuningConfig(num_virtual_tokens=a.num_virtual_tokens, task_type="CAUSAL_LM")
        what = f"prompt tuning, {a.num_virtual_tokens} virtual tokens"
    elif a.method == "prefix":
        cfg = PrefixTuningConfig(num_virtual_tokens=a.num_virtual_tokens, task_type="CAUSAL_LM")
        what = f"prefix tuning, {a.num_virtual_tokens} virtual tokens"
    else:
        cfg = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=a.targets.split(","),
                         task_type="CAUSAL_LM")
        what = f"LoRA r={a.rank} on {a.targets}"
    model = get_peft_model(base, cfg)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, a.tokens))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def cast():
        if a.bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    fwd = []
    model.eval()
    with torch.no_grad():
        for i in range(a.warmup + a.steps):
            t0 = time.perf_counter()
            with cast():
                model(input_ids=ids)
            if i >= a.warmup:
                fwd.append(time.perf_counter() - t0)
    train = []
    model.train()
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        with cast():
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= a.warmup:
            train.append(time.perf_counter() - t0)
    fm, tm = statistics.median(fwd), statistics.median(train)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n = a.tokens
    if a.json:
        print(json.dumps({
            "stack": f"peft {__import__('peft').__version__} / transformers {__import__('transformers').__version__} / torch {torch.__version__}",
            "precision": "bf16 autocast" if a.bf16 else "fp32",
            "method": what, "threads": a.threads, "tokens": n, "steps": a.steps, "trainable_params": n_train,
            "forward_tokens_per_s": n / fm, "forward_s": {"median": fm, "min": min(fwd), "max": max(fwd)},
            "train_tokens_per_s": n / tm, "train_step_s": {"median": tm, "min": min(train), "max": max(train)},
            "train_over_forward": tm / fm, "peak_rss_bytes": rss}, indent=2))
        return
    precision = "bf16 autocast" if a.bf16 else "fp32"
    print(f"PEFT + torch {torch.__version__} {precision}, {what}, {n_train} trainable, {a.threads} threads")
    print(f"forward    {n / fm:8.1f} tokens/s   step {fm:.3f} s (min {min(fwd):.3f}, max {max(fwd):.3f}) over {a.steps} steps of {n} tokens")
    print(f"train      {n / tm:8.1f} tokens/s   step {tm:.3f} s (min {min(train):.3f}, max {max(train):.3f})")
    print(f"train step / forward pass: {tm / fm:.2f}")
    print(f"peak RSS: {rss / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
