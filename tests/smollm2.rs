//! The demo model (SmolLM2-135M-Instruct Q4_1) against llama.cpp in-process.

mod common;
use common::*;
use gguf_peft::ggml::llama::LlamaModel;
use gguf_peft::ggml::Backend;
use gguf_peft::model::{Model, NoHooks};

const PROMPTS: [&str; 3] = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined \
     movable metal type, oil-based inks and a wooden press adapted from wine making. Within a few decades \
     printing shops had spread across Europe, and the cost of books fell sharply, which allowed ideas about \
     science, religion and politics to travel faster than ever before. Historians still debate how much",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number using an iterative loop.\"\"\"\n    a, b = 0, 1\n    \
     for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\ndef factorial(n):\n    \"\"\"Return n! computed \
     iteratively.\"\"\"\n    result = 1\n    for i in range(2, n + 1):\n",
    "Recipe for a simple bread: mix five hundred grams of flour with ten grams of salt, seven grams of dry \
     yeast and three hundred and fifty millilitres of warm water. Knead the dough for ten minutes until it \
     is smooth and elastic, then let it rise in a warm place for about an hour. After that,",
];

#[test]
fn logits_match_llama_cpp_on_three_prompts() {
    let path = smollm2();
    let ours = Model::load(&path, Backend::cpu(threads())).unwrap();
    let lm = LlamaModel::load(&path, false).unwrap();
    for (i, p) in PROMPTS.iter().enumerate() {
        let tokens = lm.tokenize(p, true, false);
        assert!(tokens.len() >= 64, "prompt {i} has only {} tokens", tokens.len());
        let a = logits_like_llama_cpp(&ours, &NoHooks, &tokens);
        let mut ctx = lm.context(256, threads()).unwrap();
        let b = ctx.decode(&tokens, 0).unwrap();
        let (d, m) = compare(&a, &b);
        println!(
            "prompt {i}: {} tokens, max|Δ| = {d:.3e}, max|logit| = {m:.2}, ratio {:.2e}",
            tokens.len(),
            d / m
        );
        assert!(d <= 1e-3 * m, "prompt {i}: ratio {:.2e} > 1e-3", d / m);
    }
}

#[test]
fn greedy_generation_matches_llama_cpp() {
    let path = smollm2();
    let ours = Model::load(&path, Backend::cpu(threads())).unwrap();
    let mut sched = ours.sched();
    let lm = LlamaModel::load(&path, false).unwrap();
    let prompt = lm.tokenize(PROMPTS[2], true, false);
    let n_new = 32;

    // llama.cpp: prompt in one batch, then one token at a time through its KV cache.
    let mut ctx = lm.context(256, threads()).unwrap();
    let mut logits = ctx.decode(&prompt, 0).unwrap().pop().unwrap();
    let mut theirs = Vec::new();
    for i in 0..n_new {
        let t = gguf_peft::generate::argmax(&logits) as i32;
        theirs.push(t);
        logits = ctx.decode(&[t], (prompt.len() + i) as i32).unwrap().pop().unwrap();
    }

    let opts = gguf_peft::generate::SamplingOptions {
        max_tokens: n_new,
        temperature: 0.0,
        ..Default::default()
    };
    let mine = gguf_peft::generate::generate(&ours, &mut sched, &NoHooks, &prompt, &opts, |_| false, |_| {}).unwrap();
    let text = |t: &[i32]| {
        t.iter()
            .map(|&x| String::from_utf8_lossy(&lm.token_to_piece(x, false)).into_owned())
            .collect::<String>()
    };
    println!("llama.cpp: {:?}\nours:      {:?}", text(&theirs), text(&mine));
    assert_eq!(mine, theirs);
}

#[test]
fn eval_perplexity_matches_llama_cpp() {
    let path = smollm2();
    let dir = tmpdir("eval-ppl");
    let data = dir.join("text.txt");
    let text = PROMPTS.join("\n\n");
    std::fs::write(&data, &text).unwrap();
    let ctx_size = 64;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gguf-peft"))
        .args([
            "eval",
            "--json",
            "-t",
            &threads().to_string(),
            "-c",
            &ctx_size.to_string(),
            "--model",
        ])
        .arg(&path)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ours = rep["perplexity"].as_f64().unwrap();

    // The same windows scored from llama.cpp's logits.
    let lm = LlamaModel::load(&path, false).unwrap();
    let tokens = lm.tokenize(&text, true, true);
    let (mut nll, mut n) = (0f64, 0usize);
    for w in tokens.chunks(ctx_size).filter(|w| w.len() >= 2) {
        let mut ctx = lm.context(ctx_size as u32, threads()).unwrap();
        let rows = ctx.decode(w, 0).unwrap();
        for (row, &t) in rows.iter().zip(&w[1..]) {
            nll -= gguf_peft::eval::log_prob(row, t as usize);
            n += 1;
        }
    }
    let theirs = (nll / n as f64).exp();
    let rel = (ours - theirs).abs() / theirs;
    println!("perplexity: ours {ours:.4}, llama.cpp {theirs:.4}, relative difference {rel:.2e} over {n} tokens");
    assert_eq!(rep["n_scored"].as_u64().unwrap() as usize, n);
    assert!(rel <= 0.005, "perplexity differs by {:.3}%", rel * 100.0);
    let _ = std::fs::remove_dir_all(dir);
}
