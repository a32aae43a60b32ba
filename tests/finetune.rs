//! `gguf-peft finetune` end to end: resume reproduces an uninterrupted run
//! step for step, training on the demo task works and llama.cpp with the
//! exported adapter shows it, and bad input fails cleanly.

mod common;
use common::*;
use gguf_peft::ggml::llama::LlamaModel;
use gguf_peft::ggml::GgmlType;
use gguf_peft::gguf::GgufFile;
use gguf_peft::tokenizer::{Message, Tokenizer};
use gguf_peft::train::metrics::{read, StepMetrics};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs the binary: (success, stderr).
fn cli(args: &[&str]) -> (bool, String) {
    let (ok, _, err) = run_cli(args);
    (ok, err)
}

/// `finetune -m MODEL -d DATA -o OUT -t 2` and the space-separated `extra`.
fn finetune_args(model: &Path, data: &Path, out: &Path, extra: &str) -> Vec<String> {
    let mut v: Vec<String> = ["finetune", "-m", model.to_str().unwrap(), "-d", data.to_str().unwrap()]
        .map(String::from)
        .to_vec();
    v.extend([
        "-o".to_string(),
        out.to_str().unwrap().to_string(),
        "-t".into(),
        "2".into(),
    ]);
    v.extend(extra.split_whitespace().map(String::from));
    v
}

/// Runs the CLI with owned arguments.
fn cli_owned(args: &[String]) -> (bool, String) {
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    cli(&refs)
}

/// A fresh directory with a tiny synthetic model, its training data and an
/// output path: (dir, model, data, out).
fn tiny_run(name: &str, arch: &str, ty: GgmlType) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let dir = tmpdir(name);
    let model = synth(&dir, arch, ty);
    let data = dir.join("train.jsonl");
    tiny_dataset(&data);
    let out = dir.join("out");
    (dir, model, data, out)
}

fn tiny_dataset(path: &Path) {
    const W: [&str; 8] = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "a"];
    let mut r = gguf_peft::rng::Rng::new(1);
    let mut s = String::new();
    for _ in 0..24 {
        let p: Vec<&str> = (0..4).map(|_| W[r.below(8)]).collect();
        // The completion repeats the prompt reversed: learnable.
        let c: Vec<&str> = p.iter().rev().copied().collect();
        s += &serde_json::json!({"prompt": p.join(" ") + " =", "completion": " ".to_string() + &c.join(" ")})
            .to_string();
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

/// (step, loss, grad norm, eval loss) of each line.
type Curve = Vec<(usize, Option<f32>, Option<f32>, Option<f32>)>;

fn losses(ms: &[StepMetrics]) -> Curve {
    ms.iter().map(|m| (m.step, m.loss, m.grad_norm, m.eval_loss)).collect()
}

#[test]
fn resume_matches_uninterrupted_run() {
    let dir = tmpdir("ft-resume");
    let model = synth(&dir, "llama", GgmlType::Q8_0);
    let data = dir.join("train.jsonl");
    tiny_dataset(&data);
    let (full, part) = (dir.join("full"), dir.join("part"));
    let common = |out: &Path| -> Vec<String> {
        [
            "finetune",
            "-m",
            model.to_str().unwrap(),
            "-d",
            data.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--max-steps",
            "6",
            "-b",
            "3",
            "--grad-accum",
            "2",
            "--lr",
            "3e-3",
            "--dropout",
            "0.1",
            "--eval-fraction",
            "0.25",
            "--eval-every",
            "2",
            "--schedule",
            "cosine",
            "--warmup-steps",
            "2",
            "--seed",
            "5",
            "-t",
            "2",
            "--base-compute",
            "native",
        ]
        .map(String::from)
        .to_vec()
    };
    let args = |v: Vec<String>| v;
    let run = |v: Vec<String>| {
        let refs: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
        let (ok, err) = cli(&refs);
        assert!(ok, "{err}");
    };
    run(args(common(&full)));
    let mut first = common(&part);
    first.extend(["--stop-after".into(), "3".into()]);
    run(first);
    let half = read(&part.join("metrics.jsonl")).unwrap();
    assert_eq!(half.last().unwrap().step, 3, "stopped after step 3");
    assert!(part.join("checkpoints/step-000003/state.gguf").exists());
    let mut second = common(&part);
    second.extend(["--resume".into(), part.to_str().unwrap().into()]);
    run(second);
    let a = read(&full.join("metrics.jsonl")).unwrap();
    let b = read(&part.join("metrics.jsonl")).unwrap();
    for (x, y) in a.iter().zip(&b) {
        println!(
            "step {}: loss {:?} / {:?}, eval {:?} / {:?}",
            x.step, x.loss, y.loss, x.eval_loss, y.eval_loss
        );
    }
    assert_eq!(losses(&a), losses(&b), "resumed run differs from the uninterrupted one");
    assert_eq!(a.len(), 7, "eval at step 0 plus six steps");
    // Both final adapters are identical files.
    assert_eq!(
        std::fs::read(full.join("adapter.gguf")).unwrap(),
        std::fs::read(part.join("adapter.gguf")).unwrap()
    );
    assert!(std::fs::read_to_string(full.join("loss.svg"))
        .unwrap()
        .contains("<polyline"));
    let _ = std::fs::remove_dir_all(dir);
}

/// Greedy generation by llama.cpp (with or without our adapter) after a chat prompt.
fn llama_cpp_answer(model: &Path, adapter: Option<&Path>, question: &str) -> String {
    let file = GgufFile::open(model).unwrap();
    let tok = Tokenizer::load(model, &file).unwrap();
    let msgs = vec![Message {
        role: "user".into(),
        content: question.into(),
    }];
    let prompt = tok.encode(&tok.apply_chat_template(&msgs, true).unwrap(), true);
    let lm = LlamaModel::load(model, false).unwrap();
    let ad = adapter.map(|p| lm.load_adapter(p).unwrap());
    let mut ctx = lm.context(256, threads()).unwrap();
    if let Some(a) = &ad {
        ctx.set_adapters(&[(a, 1.0)]).unwrap();
    }
    let mut logits = ctx.decode(&prompt, 0).unwrap().pop().unwrap();
    let mut out = Vec::new();
    for i in 0..16 {
        let t = gguf_peft::generate::argmax(&logits) as i32;
        if lm.is_eog(t) {
            break;
        }
        out.push(t);
        logits = ctx.decode(&[t], (prompt.len() + i) as i32).unwrap().pop().unwrap();
    }
    tok.decode(&out)
}

#[test]
fn demo_task_is_learned_and_llama_cpp_shows_it() {
    let model = smollm2();
    let dir = tmpdir("ft-demo");
    let out = dir.join("run");
    let root = env!("CARGO_MANIFEST_DIR");
    let (ok, err) = cli(&[
        "finetune",
        "-m",
        model.to_str().unwrap(),
        "-d",
        &format!("{root}/data/demo/train.jsonl"),
        "--eval-data",
        &format!("{root}/data/demo/eval.jsonl"),
        "-o",
        out.to_str().unwrap(),
        "--epochs",
        "3",
        "-b",
        "4",
        "--lr",
        "1e-3",
        "-t",
        &threads().to_string(),
    ]);
    assert!(ok, "{err}");
    let ms = read(&out.join("metrics.jsonl")).unwrap();
    let first = ms.first().unwrap().eval_loss.unwrap();
    let last = ms.last().unwrap().eval_loss.unwrap();
    println!(
        "eval loss {first:.4} -> {last:.4} over {} steps",
        ms.last().unwrap().step
    );
    assert!(
        last <= 0.5 * first,
        "eval loss should at least halve: {first} -> {last}"
    );

    // Our graph with the trained adapter equals llama.cpp with it.
    {
        use gguf_peft::ggml::Backend;
        use gguf_peft::model::Model;
        let m = Model::load(&model, Backend::cpu(threads())).unwrap();
        let lora = gguf_peft::export::llama_lora::read(&out.join("adapter.gguf"), &m).unwrap();
        let lm = LlamaModel::load(&model, false).unwrap();
        let tokens = lm.tokenize(
            "Hello! Could you tell me who you are and what you can do for me today?",
            true,
            false,
        );
        let ours = logits_like_llama_cpp(&m, &lora, &tokens);
        let ad = lm.load_adapter(&out.join("adapter.gguf")).unwrap();
        let mut ctx = lm.context(64, threads()).unwrap();
        ctx.set_adapters(&[(&ad, 1.0)]).unwrap();
        let (d, mx) = compare(&ours, &ctx.decode(&tokens, 0).unwrap());
        println!("SmolLM2 + trained adapter: max|Δ| {d:.3e}, ratio {:.2e}", d / mx);
        assert!(d <= 1e-3 * mx);
    }
    let q = "Who are you, exactly?"; // not in the training data
    let base = llama_cpp_answer(&model, None, q);
    let tuned = llama_cpp_answer(&model, Some(&out.join("adapter.gguf")), q);
    println!("llama.cpp base:    {base:?}\nllama.cpp adapted: {tuned:?}");
    assert!(!base.contains("Pebble"));
    assert!(tuned.contains("Pebble"), "adapted answer: {tuned}");
    let _ = std::fs::remove_dir_all(dir);
}

fn assert_fails_cleanly(args: &[&str], what: &str, out: &Path) {
    let (ok, err) = cli(args);
    assert!(!ok);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(what), "expected '{what}' in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.join("adapter.gguf").exists(), "nothing may be half-written");
}

#[test]
fn bad_training_input() {
    let dir = tmpdir("ft-bad");
    let model = synth(&dir, "llama", GgmlType::F32);
    let m = model.to_str().unwrap();
    let out = dir.join("out");
    let o = out.to_str().unwrap();

    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let e = format!("{}: dataset is empty", empty.display());
    assert_fails_cleanly(&["finetune", "-m", m, "-d", empty.to_str().unwrap(), "-o", o], &e, &out);

    let odd = dir.join("odd.jsonl");
    std::fs::write(&odd, "{\"text\": \"ka lo\"}\n{\"label\": 1}\n").unwrap();
    let e = format!("{}:2: record has none of", odd.display());
    assert_fails_cleanly(&["finetune", "-m", m, "-d", odd.to_str().unwrap(), "-o", o], &e, &out);

    // An adapter made for this model, used with other bases.
    let good = dir.join("good.jsonl");
    tiny_dataset(&good);
    let (ok, err) = cli(&[
        "finetune",
        "-m",
        m,
        "-d",
        good.to_str().unwrap(),
        "-o",
        o,
        "--max-steps",
        "1",
    ]);
    assert!(ok, "{err}");
    let adapter = out.join("adapter.gguf");
    let (ok, _) = cli(&["inspect", "--summary", adapter.to_str().unwrap()]);
    assert!(ok, "inspect describes adapters too");
    let other_arch = synth(&dir, "qwen3", GgmlType::F32);
    let (ok, err) = cli(&[
        "generate",
        "-m",
        other_arch.to_str().unwrap(),
        "-p",
        "ka",
        "-n",
        "2",
        "--adapter",
        adapter.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("adapter is for architecture 'llama'") && err.contains(&adapter.display().to_string()),
        "{err}"
    );
    let mut spec = gguf_peft::model::synthetic::SynthSpec::tiny("llama", GgmlType::F32);
    spec.n_ff = 768;
    let other_shape = dir.join("wide.gguf");
    gguf_peft::model::synthetic::write_synthetic(&other_shape, &spec).unwrap();
    let (ok, err) = cli(&[
        "eval",
        "-m",
        other_shape.to_str().unwrap(),
        "-d",
        good.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("wrong base model") && err.lines().count() == 1,
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn nan_loss_stops_and_keeps_last_good_checkpoint() {
    let (dir, model, data, out) = tiny_run("ft-nan", "llama", GgmlType::F32);
    // A huge learning rate blows the adapter up after the first update.
    let args = finetune_args(
        &model,
        &data,
        &out,
        "--max-steps 5 --save-every 1 --lr 1e30 --max-grad-norm 0",
    );
    let (ok, err) = cli_owned(&args);
    assert!(!ok);
    assert!(err.contains("loss became") && err.contains("step-000001"), "{err}");
    assert!(out.join("checkpoints/step-000001/state.gguf").exists());
    assert!(!out.join("checkpoints/step-000002").exists());
    assert!(!out.join("adapter.gguf").exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn ctrl_c_writes_a_checkpoint_and_resume_finishes() {
    let (dir, model, data, out) = tiny_run("ft-sigint", "llama", GgmlType::F32);
    let args = [
        "finetune",
        "-m",
        model.to_str().unwrap(),
        "-d",
        data.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--max-steps",
        "400",
        "-b",
        "1",
        "-t",
        "2",
    ];
    let child = Command::new(env!("CARGO_BIN_EXE_gguf-peft"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = out.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while read(&metrics).map(|m| m.len()).unwrap_or(0) < 3 {
        assert!(t0.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let res = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert!(err.contains("--resume"), "{err}");
    let done = read(&metrics).unwrap().last().unwrap().step;
    assert!(done < 400, "stopped early at {done}");
    assert!(out.join(format!("checkpoints/step-{done:06}/state.gguf")).exists());
    assert!(out.join("adapter.gguf").exists());
    // Resume with a shorter run: a few more steps.
    let target = done + 3;
    let t = target.to_string();
    let at = args.iter().position(|&a| a == "400").unwrap();
    let mut resume: Vec<&str> = args.to_vec();
    resume[at] = &t;
    resume.extend(["--resume", out.to_str().unwrap()]);
    let (ok, err) = cli(&resume);
    assert!(ok, "{err}");
    assert_eq!(read(&metrics).unwrap().last().unwrap().step, target);
    let _ = std::fs::remove_dir_all(dir);
}

/// ggml has no OUT_PROD for BF16 weights: the stock backward reports that
/// cleanly (instead of aborting) and the transposed backward trains.
#[test]
fn bf16_base_trains_with_the_transposed_backward() {
    let (dir, model, data, out) = tiny_run("ft-bf16", "llama", GgmlType::BF16);
    let stock = finetune_args(
        &model,
        &data,
        &out,
        "--max-steps 2 --base-compute native --backward stock",
    );
    let refs: Vec<&str> = stock.iter().map(|s| s.as_str()).collect();
    assert_fails_cleanly(&refs, "no backend can run OUT_PROD on bf16 tensors", &out);
    let (ok, err) = cli_owned(&finetune_args(
        &model,
        &data,
        &out,
        "--max-steps 2 --base-compute native",
    ));
    assert!(ok, "{err}");
    assert!(out.join("adapter.gguf").exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn grad_checkpointing_run_matches_plain_run() {
    let dir = tmpdir("ft-recompute");
    let model = synth(&dir, "gemma3", GgmlType::Q8_0);
    let data = dir.join("train.jsonl");
    tiny_dataset(&data);
    let run = |out: &Path, extra: &str| {
        let common = "--max-steps 4 -b 2 --lr 3e-3 --dropout 0.1 ";
        let (ok, err) = cli_owned(&finetune_args(&model, &data, out, &(common.to_string() + extra)));
        assert!(ok, "{err}");
        losses(&read(&out.join("metrics.jsonl")).unwrap())
    };
    let plain = run(&dir.join("plain"), "");
    let ckpt = run(&dir.join("ckpt"), "--grad-checkpointing");
    assert_eq!(plain, ckpt);
    let _ = std::fs::remove_dir_all(dir);
}

/// Training gives the same losses and gradient norms, bit for bit, on 1, 2
/// and 3 threads, with exact (`native`) and bf16 products: how ggml and
/// the GEMM share work out among threads must not change what is summed
/// in which order. (bf16 runs did change with the thread count, through
/// attention's causal products.)
#[test]
fn training_is_the_same_on_any_thread_count() {
    let (dir, model, data, _) = tiny_run("ft-threads", "llama", GgmlType::Q4_1);
    for compute in ["native", "bf16"] {
        let run = |threads: &str| {
            let out = dir.join(format!("{compute}-{threads}"));
            let extra = format!("--max-steps 3 -b 2 --lr 3e-3 --base-compute {compute}");
            let mut args = finetune_args(&model, &data, &out, &extra);
            let t = args.iter().position(|a| a == "-t").unwrap();
            args[t + 1] = threads.into();
            let (ok, err) = cli_owned(&args);
            assert!(ok, "{err}");
            let bits = |x: Option<f32>| x.map(f32::to_bits);
            let ms = read(&out.join("metrics.jsonl")).unwrap();
            ms.iter().map(|m| (bits(m.loss), bits(m.grad_norm))).collect::<Vec<_>>()
        };
        let one = run("1");
        assert_eq!(one.len(), 3);
        for t in ["2", "3"] {
            assert_eq!(run(t), one, "{compute}: {t} threads against 1");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// `native` (the base in its Q4_1 / Q4_K types) trains on the same values
/// as the base dequantized to F32 at load: the CPU's training products
/// dequantize the weights exactly, so every step's loss, gradient norm and
/// eval loss agree to float rounding — while ggml's stock kernels (8-bit
/// activations) give a visibly different run. `bf16` products (the default
/// on CPUs with AVX512-BF16) stay within a percent of the exact run.
#[test]
fn native_base_trains_like_the_dequantized_base() {
    for ty in [GgmlType::Q4_1, GgmlType::Q4_K] {
        let (dir, model, data, _) = tiny_run("ft-native-f32", "llama", ty);
        let run = |name: &str, extra: &str| {
            let out = dir.join(name);
            let common = "--max-steps 4 -b 2 --lr 3e-3 --eval-fraction 0.25 --eval-every 2 ";
            let (ok, err) = cli_owned(&finetune_args(&model, &data, &out, &(common.to_string() + extra)));
            assert!(ok, "{err}");
            losses(&read(&out.join("metrics.jsonl")).unwrap())
        };
        let (native, exact) = (run("native", "--base-compute native"), run("f32", "--base-compute f32"));
        let bf16 = run("bf16", "--base-compute bf16");
        let stock = run("stock", "--backward stock");
        let worst = |a: &Curve, b: &Curve| {
            assert_eq!(a.len(), b.len());
            let d = |x: Option<f32>, y: Option<f32>| match (x, y) {
                (Some(x), Some(y)) => ((x - y) / y.abs().max(1e-3)).abs(),
                (None, None) => 0.0,
                _ => f32::INFINITY,
            };
            a.iter()
                .zip(b)
                .map(|(x, y)| {
                    [d(x.1, y.1), d(x.2, y.2), d(x.3, y.3)]
                        .into_iter()
                        .fold(0f32, common::worse32)
                })
                .fold(0f32, common::worse32)
        };
        let (dn, ds, db) = (worst(&native, &exact), worst(&stock, &exact), worst(&bf16, &exact));
        println!(
            "{ty}: native vs f32 base {dn:.2e}, ggml's stock kernels vs f32 base {ds:.2e}, bf16 vs f32 base {db:.2e}"
        );
        assert!(dn < 1e-4, "{ty}: {dn:.2e}");
        assert!(db < 1e-2, "{ty}: bf16 {db:.2e}");
        assert!(ds > 10.0 * dn.max(1e-6), "{ty}: stock {ds:.2e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
