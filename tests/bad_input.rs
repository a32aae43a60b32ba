//! Bad input gives one clear line naming the file, never a panic.

mod common;
use common::*;
use gguf_peft::ggml::GgmlType;
use std::path::Path;

use common::run_cli as run;

/// Fails with exactly one stderr line that starts with "error:", names the
/// file and contains `what`.
fn assert_one_line_error(args: &[&str], file: &Path, what: &str) {
    let (ok, _, err) = run(args);
    assert!(!ok, "expected failure for {args:?}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(&file.display().to_string()), "no file name in: {err}");
    assert!(lines[0].contains(what), "expected '{what}' in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn truncated_gguf() {
    let dir = tmpdir("bad-trunc");
    let good = synth(&dir, "llama", GgmlType::Q8_0);
    let bytes = std::fs::read(&good).unwrap();
    for (name, len) in [
        ("head.gguf", 20),
        ("half.gguf", bytes.len() / 2),
        ("last.gguf", bytes.len() - 7),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, &bytes[..len]).unwrap();
        let ps = p.to_str().unwrap();
        assert_one_line_error(&["inspect", ps], &p, "truncated");
        assert_one_line_error(&["generate", "-m", ps, "-p", "hi", "-n", "1"], &p, "truncated");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn not_a_gguf() {
    let dir = tmpdir("bad-magic");
    let p = dir.join("model.gguf");
    std::fs::write(&p, b"this is not a model at all, just some text").unwrap();
    assert_one_line_error(&["inspect", p.to_str().unwrap()], &p, "not a GGUF file");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn unsupported_architecture() {
    let dir = tmpdir("bad-arch");
    let good = synth(&dir, "llama", GgmlType::F16);
    // Rewrite general.architecture in place: same length keeps offsets valid.
    let mut bytes = std::fs::read(&good).unwrap();
    let needle = b"\x05\x00\x00\x00\x00\x00\x00\x00llama";
    let at = bytes.windows(needle.len()).position(|w| w == needle).unwrap();
    bytes[at + 8..at + 13].copy_from_slice(b"mamba");
    let p = dir.join("mamba.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let ps = p.to_str().unwrap();
    assert_one_line_error(
        &["generate", "-m", ps, "-p", "hi"],
        &p,
        "unsupported architecture 'mamba'",
    );
    assert_one_line_error(&["eval", "-m", ps, "-d", ps], &p, "unsupported architecture");
    // inspect still describes the file and says it is not supported.
    let (ok, out, _) = run(&["inspect", ps]);
    assert!(ok && out.contains("not supported"), "{out}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn missing_file() {
    let p = Path::new("/nonexistent/dir/model.gguf");
    assert_one_line_error(&["inspect", p.to_str().unwrap()], p, "no such file");
    assert_one_line_error(&["generate", "-m", p.to_str().unwrap(), "-p", "x"], p, "no such file");
}

#[test]
fn malformed_eval_data() {
    let dir = tmpdir("bad-data");
    let model = synth(&dir, "llama", GgmlType::F32);
    let data = dir.join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\n{\"label\": 3}\n").unwrap();
    let (ok, _, err) = run(&["eval", "-m", model.to_str().unwrap(), "-d", data.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.trim().lines().count() == 1 && err.contains(&format!("{}:2:", data.display())),
        "{err}"
    );
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    assert_one_line_error(
        &["eval", "-m", model.to_str().unwrap(), "-d", empty.to_str().unwrap()],
        &empty,
        "empty",
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn wrong_tensor_shape() {
    let dir = tmpdir("bad-shape");
    let good = synth(&dir, "llama", GgmlType::F32);
    // Claim a different feed-forward width: every ffn tensor then mismatches.
    let mut bytes = std::fs::read(&good).unwrap();
    let key = b"llama.feed_forward_length";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4;
    bytes[at..at + 4].copy_from_slice(&1024u32.to_le_bytes());
    let p = dir.join("shape.gguf");
    std::fs::write(&p, &bytes).unwrap();
    assert_one_line_error(
        &["generate", "-m", p.to_str().unwrap(), "-p", "x"],
        &p,
        "maybe wrong base model",
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Soft prompts on the wrong base, truncated, or PEFT prompt adapters of the
/// wrong width; labeled data for a method without a head.
#[test]
fn soft_prompt_misuse() {
    use gguf_peft::ggml::Backend;
    use gguf_peft::model::Model;
    use gguf_peft::peft::prompt_tuning::{PromptInit, PromptTuningConfig};
    use gguf_peft::peft::MethodConfig;
    let dir = tmpdir("bad-soft-prompt");
    let llama = synth(&dir, "llama", GgmlType::F32);
    let qwen = synth(&dir, "qwen2", GgmlType::F32);
    let model = Model::load(&llama, Backend::cpu(threads())).unwrap();
    let cfg = MethodConfig::Prompt(PromptTuningConfig {
        num_virtual_tokens: 4,
        init: PromptInit::Random,
    });
    let sp = dir.join("prompt.gguf");
    cfg.build(&model, None, 1).unwrap().write_adapter(&model, &sp).unwrap();
    let (q, s) = (qwen.to_str().unwrap(), sp.to_str().unwrap());
    assert_one_line_error(
        &["generate", "-m", q, "-p", "hi", "-n", "1", "--adapter", s],
        &sp,
        "wrong base model",
    );
    let l = llama.to_str().unwrap();
    assert_one_line_error(
        &[
            "eval",
            "-m",
            l,
            "-d",
            sp.to_str().unwrap(),
            "--adapter",
            s,
            "--adapter-scale",
            "0.5",
        ],
        &sp,
        "LoRA adapters only",
    );
    let bytes = std::fs::read(&sp).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 9]).unwrap();
    assert_one_line_error(
        &[
            "generate",
            "-m",
            l,
            "-p",
            "hi",
            "-n",
            "1",
            "--adapter",
            cut.to_str().unwrap(),
        ],
        &cut,
        "truncated",
    );
    // A PEFT prompt adapter for a model of another width.
    let peft = dir.join("peft");
    gguf_peft::export::peft_prompt::export(&sp, &model, &peft).unwrap();
    let st = peft.join("adapter_model.safetensors");
    let data = vec![0u8; 4 * 4 * 100];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 100], &data).unwrap();
    std::fs::write(
        &st,
        safetensors::serialize(vec![("prompt_embeddings", view)], None).unwrap(),
    )
    .unwrap();
    let out = dir.join("back.gguf");
    assert_one_line_error(
        &[
            "import-adapter",
            peft.to_str().unwrap(),
            "-m",
            l,
            "-o",
            out.to_str().unwrap(),
        ],
        &st,
        "wrong base model",
    );
    assert!(!out.exists());
    // Labeled records need the method with a classification head.
    let data = dir.join("labeled.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"good\", \"label\": \"pos\"}\n{\"text\": \"bad\", \"label\": \"neg\"}\n",
    )
    .unwrap();
    let o = dir.join("run");
    assert_one_line_error(
        &[
            "finetune",
            "-m",
            l,
            "-d",
            data.to_str().unwrap(),
            "-o",
            o.to_str().unwrap(),
            "--method",
            "prompt",
        ],
        &data,
        "ptuning-v2",
    );
    let _ = std::fs::remove_dir_all(dir);
}
