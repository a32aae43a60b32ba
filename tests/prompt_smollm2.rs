//! The prompt family on the real model (SmolLM2-135M-Instruct Q4_1) through
//! the CLI: each method lowers the eval loss of a small synthetic task —
//! keyword sentiment labels after "Sentiment:" — by at least half, prints
//! its trainable parameters as PEFT does, and its adapter file serves
//! `eval` and `generate`.

mod common;
use common::*;
use gguf_peft::train::metrics::read;
use std::path::Path;

const GOOD: [&str; 4] = ["good", "great", "lovely", "excellent"];
const BAD: [&str; 4] = ["bad", "awful", "terrible", "boring"];
const THINGS: [&str; 6] = ["movie", "food", "hotel", "book", "concert", "game"];

/// `n` records: a sentence about two things with one keyword each (both of
/// one polarity), then " positive" / " negative".
fn sentiment_data(path: &Path, n: usize, seed: u64) {
    let mut r = gguf_peft::rng::Rng::new(seed);
    let mut s = String::new();
    for _ in 0..n {
        let pos = r.below(2) == 0;
        let w = if pos { GOOD } else { BAD };
        let text = format!(
            "The {} was {} and the {} was {}.\nSentiment:",
            THINGS[r.below(6)],
            w[r.below(4)],
            THINGS[r.below(6)],
            w[r.below(4)]
        );
        let label = if pos { " positive" } else { " negative" };
        s.push_str(&serde_json::json!({"prompt": text, "completion": label}).to_string());
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

use common::run_cli as cli;

/// `finetune` on `train` with `eval` held out, batches of 8, 12 steps and
/// the `extra` options; returns its stderr (it must succeed).
fn finetune(m: &str, train: &Path, eval: &Path, out: &Path, extra: &str) -> String {
    let mut args = vec![
        "finetune",
        "-m",
        m,
        "-d",
        train.to_str().unwrap(),
        "--eval-data",
        eval.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-t",
        "2",
        "--batch-size",
        "8",
        "--max-steps",
        "12",
    ];
    args.extend(extra.split_whitespace());
    let (ok, _, err) = cli(&args);
    assert!(ok, "finetune {extra} failed:\n{err}");
    err
}

#[test]
fn every_prompt_method_learns_the_synthetic_task() {
    let model = smollm2();
    let m = model.to_str().unwrap();
    let dir = tmpdir("prompt-smollm2");
    let (train, eval) = (dir.join("train.jsonl"), dir.join("eval.jsonl"));
    sentiment_data(&train, 48, 1);
    sentiment_data(&eval, 16, 2);
    for (method, extra) in [
        ("prompt", "--num-virtual-tokens 8"),
        ("ptuning", "--num-virtual-tokens 8 --encoder-hidden-size 128"),
        ("prefix", "--num-virtual-tokens 8"),
        // A task-specific (shorter) length for the deep prompts.
        ("ptuning-v2", "--num-virtual-tokens 4"),
    ] {
        let out = dir.join(method);
        let t0 = std::time::Instant::now();
        let err = finetune(m, &train, &eval, &out, &format!("--method {method} {extra}"));
        let line = err
            .lines()
            .find(|l| l.starts_with("trainable params: "))
            .unwrap_or_else(|| panic!("{method}: no parameter line in\n{err}"));
        assert!(line.contains(" || all params: ") && line.contains(" || trainable%: "));
        let ms = read(&out.join("metrics.jsonl")).unwrap();
        let evals: Vec<f32> = ms.iter().filter_map(|m| m.eval_loss).collect();
        let (first, last) = (evals[0], *evals.last().unwrap());
        println!(
            "{method}: {line}; eval loss {first:.4} -> {last:.4} in 12 steps ({:.1} s)",
            t0.elapsed().as_secs_f64()
        );
        assert!(
            last <= 0.5 * first,
            "{method}: eval loss should at least halve: {first} -> {last}"
        );

        // The adapter file serves eval and generate.
        let adapter = out.join("adapter.gguf");
        let (ok, stdout, err) = cli(&[
            "eval",
            "-m",
            m,
            "-d",
            eval.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
        ]);
        assert!(ok, "{method}: eval failed: {err}");
        assert!(stdout.contains("perplexity"), "{method}: {stdout}");
        let (ok, stdout, err) = cli(&[
            "generate",
            "-m",
            m,
            "-p",
            "The hotel was lovely and the food was great.\nSentiment:",
            "-n",
            "2",
            "--adapter",
            adapter.to_str().unwrap(),
        ]);
        assert!(ok, "{method}: generate failed: {err}");
        println!("{method}: generates '{}'", stdout.trim().replace('\n', " "));
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// `{"text","label"}` records with P-tuning v2 train deep prompts and a
/// classification head: the eval loss (cross-entropy over the classes) at
/// least halves, held-out accuracy reaches 90 %, and `eval` / `generate`
/// with the adapter report accuracy and labels.
#[test]
fn ptuning_v2_trains_a_classifier() {
    let model = smollm2();
    let m = model.to_str().unwrap();
    let dir = tmpdir("prompt-smollm2-cls");
    let (train, eval) = (dir.join("train.jsonl"), dir.join("eval.jsonl"));
    for (path, n, seed) in [(&train, 48, 3), (&eval, 16, 4)] {
        sentiment_data(path, n, seed);
        // As labeled records: the sentence, its polarity.
        let labeled: String = std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let text = v["prompt"].as_str().unwrap().trim_end_matches("\nSentiment:");
                let label = v["completion"].as_str().unwrap().trim();
                serde_json::json!({"text": text, "label": label}).to_string() + "\n"
            })
            .collect();
        std::fs::write(path, labeled).unwrap();
    }
    let out = dir.join("out");
    let err = finetune(m, &train, &eval, &out, "--method ptuning-v2 --num-virtual-tokens 4");
    assert!(err.contains("classification: 2 classes"), "{err}");
    let ms = read(&out.join("metrics.jsonl")).unwrap();
    let evals: Vec<f32> = ms.iter().filter_map(|m| m.eval_loss).collect();
    let (first, last) = (evals[0], *evals.last().unwrap());
    println!("ptuning-v2 classifier: eval loss {first:.4} -> {last:.4}");
    assert!(
        last <= 0.5 * first,
        "eval loss should at least halve: {first} -> {last}"
    );
    let adapter = out.join("adapter.gguf");
    let a = adapter.to_str().unwrap();
    let (ok, stdout, err) = cli(&["eval", "-m", m, "-d", eval.to_str().unwrap(), "--adapter", a, "--json"]);
    assert!(ok, "eval failed: {err}");
    let rep: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    println!("held-out: {rep}");
    assert!(rep["accuracy"].as_f64().unwrap() >= 0.9, "{rep}");
    let (ok, stdout, err) = cli(&[
        "generate",
        "-m",
        m,
        "-p",
        "The concert was awful and the hotel was terrible.",
        "--adapter",
        a,
    ]);
    assert!(ok, "generate failed: {err}");
    assert_eq!(stdout.trim(), "negative", "{err}");
    // Language-model data on this adapter is refused with a message.
    let (ok, _, err) = cli(&["eval", "-m", m, "-d", "data/demo/eval.jsonl", "--adapter", a]);
    assert!(!ok && err.contains("label"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}
