//! The prompt family (prompt tuning, P-tuning, prefix tuning, P-tuning v2):
//! gradients against finite differences, the zero-length identity, packed
//! sequences, adapter files against training-time logits, and prompt
//! tuning through llama.cpp's embedding batch.

mod common;
use common::*;
use gguf_peft::data::Example;
use gguf_peft::ggml::llama::LlamaModel;
use gguf_peft::ggml::{Backend, GgmlType};
use gguf_peft::model::{Batch, Model, NoHooks};
use gguf_peft::peft::p_tuning::{Encoder, PTuningConfig};
use gguf_peft::peft::prefix::PrefixConfig;
use gguf_peft::peft::prompt_tuning::{PromptInit, PromptTuningConfig};
use gguf_peft::peft::{load_adapter, MethodConfig, Trainable};
use gguf_peft::train::{loss_and_grads, recompute::loss_and_grads_recompute};

fn prompt(n: usize) -> MethodConfig {
    MethodConfig::Prompt(PromptTuningConfig {
        num_virtual_tokens: n,
        init: PromptInit::Vocab,
    })
}

fn ptuning(n: usize, encoder: Encoder) -> MethodConfig {
    MethodConfig::Ptuning(PTuningConfig {
        num_virtual_tokens: n,
        encoder,
        encoder_hidden_size: 16,
        encoder_num_layers: 2,
    })
}

fn prefix(n: usize, projection: Option<usize>, ptuning_v2: bool) -> MethodConfig {
    MethodConfig::Prefix(PrefixConfig {
        num_virtual_tokens: n,
        projection,
        init: PromptInit::Random,
        ptuning_v2,
        keep_positions: false,
        classes: Vec::new(),
    })
}

/// Every method, named, with `n` virtual tokens.
fn methods(n: usize) -> Vec<(&'static str, MethodConfig)> {
    vec![
        ("prompt", prompt(n)),
        ("ptuning-mlp", ptuning(n, Encoder::Mlp)),
        ("ptuning-lstm", ptuning(n, Encoder::Lstm)),
        ("prefix", prefix(n, None, false)),
        ("prefix-projection", prefix(n, Some(24), false)),
        ("ptuning-v2", prefix(n, None, true)),
        ("prefix-keep-positions", {
            let MethodConfig::Prefix(mut c) = prefix(n, None, false) else {
                unreachable!()
            };
            c.keep_positions = true;
            MethodConfig::Prefix(c)
        }),
    ]
}

/// Two examples of different lengths, loss on the second half of each.
fn examples(n_vocab: usize) -> Vec<Example> {
    [(9, 5), (6, 6)]
        .iter()
        .map(|&(len, seed)| {
            let tokens = some_tokens(len, n_vocab, seed);
            let loss = (0..len).map(|i| i >= len / 2).collect();
            Example {
                tokens,
                loss,
                label: None,
            }
        })
        .collect()
}

/// Checks every trainable tensor's gradient (its two largest entries)
/// against central differences and against gradient checkpointing; returns
/// the loss and the worst relative error.
fn check_gradients(name: &str, model: &Model, m: &dyn Trainable, refs: &[&Example]) -> (f32, f32) {
    let mut sched = model.sched();
    let (l0, _, grads) = loss_and_grads(model, m, &mut sched, refs).unwrap();
    let (l1, _, grads_rc) = loss_and_grads_recompute(model, m, &mut sched, refs).unwrap();
    assert!(
        (l0 - l1).abs() <= 1e-5 * l0.abs(),
        "{name}: loss {l0} vs recomputed {l1}"
    );
    let params = m.params();
    let eps = 1e-2f32;
    let mut worst = 0f32;
    for (i, pname) in m.param_names().iter().enumerate() {
        let g = &grads[i];
        let scale = g.iter().fold(0f32, |a, x| a.max(x.abs()));
        let rc = g
            .iter()
            .zip(&grads_rc[i])
            .fold(0f32, |a, (x, y)| worse32(a, (x - y).abs()));
        assert!(
            rc <= 1e-4 * scale.max(1e-6),
            "{name} {pname}: recomputed gradient differs by {rc:.2e}"
        );
        let mut vals = params[i].read_f32();
        let mut idx: Vec<usize> = (0..g.len()).collect();
        idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &j in idx.iter().take(2) {
            let orig = vals[j];
            let mut loss_at = |v: f32| {
                vals[j] = v;
                params[i].write_f32(&vals);
                loss_and_grads(model, m, &mut sched, refs).unwrap().0
            };
            let (lp, lm) = (loss_at(orig + eps), loss_at(orig - eps));
            vals[j] = orig;
            params[i].write_f32(&vals);
            let fd = (lp - lm) / (2.0 * eps);
            let rel = (fd - g[j]).abs() / g[j].abs().max(1e-3);
            worst = worst.max(rel);
            assert!(
                rel <= 1e-2,
                "{name} {pname}[{j}]: gradient {:.5e}, central difference {fd:.5e}, relative error {rel:.2e}",
                g[j]
            );
        }
    }
    (l0, worst)
}

/// Central differences on the entries with the largest gradients of every
/// trainable tensor; the batch packs two sequences, so the virtual tokens
/// are inserted twice.
#[test]
fn gradients_match_finite_differences() {
    let dir = tmpdir("prompt-fd");
    let path = synth(&dir, "llama", GgmlType::F32);
    let model = Model::load(&path, Backend::cpu(threads())).unwrap();
    let exs = examples(model.hparams.n_vocab);
    let refs: Vec<&Example> = exs.iter().collect();
    for (name, cfg) in methods(3) {
        let m = cfg.build(&model, None, 7).unwrap();
        let (l0, worst) = check_gradients(name, &model, &*m, &refs);
        println!(
            "{name}: loss {l0:.4}, {} tensors ({} values), worst relative error {worst:.2e}",
            m.params().len(),
            m.n_trainable()
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// With no virtual tokens every method leaves the model as it is.
#[test]
fn zero_length_prompts_leave_logits_unchanged() {
    let dir = tmpdir("prompt-zero");
    for arch in ["llama", "gemma3"] {
        let path = synth(&dir, arch, GgmlType::Q8_0);
        let model = Model::load(&path, Backend::cpu(threads())).unwrap();
        let tokens = some_tokens(12, model.hparams.n_vocab, 1);
        let mut sched = model.sched();
        let base = model.logits(&mut sched, &Batch::single(&tokens), &NoHooks).unwrap();
        for (name, cfg) in methods(0) {
            let m = cfg.build(&model, None, 3).unwrap();
            assert_eq!(m.n_trainable(), 0, "{name}");
            let got = model.logits(&mut sched, &Batch::single(&tokens), &*m).unwrap();
            assert_eq!(compare(&got, &base).0, 0.0, "{arch} {name}: logits moved");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Two sequences packed in one batch get the same logits as each alone:
/// the virtual tokens are inserted before each, positions restart.
#[test]
fn packed_sequences_match_single_ones() {
    let dir = tmpdir("prompt-packed");
    let path = synth(&dir, "qwen2", GgmlType::F32);
    let model = Model::load(&path, Backend::cpu(threads())).unwrap();
    let exs = examples(model.hparams.n_vocab);
    let mut sched = model.sched();
    for (name, cfg) in methods(4) {
        let m = cfg.build(&model, None, 5).unwrap();
        let (packed, _) = gguf_peft::train::make_batch(&exs.iter().collect::<Vec<_>>());
        let all = Batch {
            outputs: None,
            ..packed
        };
        let got = model.logits(&mut sched, &all, &*m).unwrap();
        let mut want = Vec::new();
        for e in &exs {
            want.extend(model.logits(&mut sched, &Batch::single(&e.tokens), &*m).unwrap());
        }
        let (d, mx) = compare(&got, &want);
        assert!(d <= 1e-4 * mx, "{name}: packed vs single {d:.3e} (max {mx:.3})");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A trained adapter written to its file and loaded back (as `generate` and
/// `eval` load it) gives the training-time logits; generation over the
/// cache agrees with the full forward.
#[test]
fn adapter_files_reproduce_training_logits() {
    let dir = tmpdir("prompt-files");
    let path = synth(&dir, "gemma3", GgmlType::Q4_K);
    let model = Model::load(&path, Backend::cpu(threads())).unwrap();
    let tokens = some_tokens(10, model.hparams.n_vocab, 9);
    let mut sched = model.sched();
    for (name, cfg) in methods(5) {
        let m = cfg.build(&model, None, 11).unwrap();
        // A few steps of training so nothing is at its init.
        let exs = examples(model.hparams.n_vocab);
        let refs: Vec<&Example> = exs.iter().collect();
        let (_, _, grads) = loss_and_grads(&model, &*m, &mut sched, &refs).unwrap();
        for (p, g) in m.params().iter().zip(&grads) {
            let v: Vec<f32> = p.read_f32().iter().zip(g).map(|(x, d)| x - 0.5 * d).collect();
            p.write_f32(&v);
        }
        let want = model.logits(&mut sched, &Batch::single(&tokens), &*m).unwrap();
        let file = dir.join(format!("{name}.gguf"));
        m.write_adapter(&model, &file).unwrap();
        let loaded = load_adapter(&model, &file, 1.0).unwrap();
        let got = model.logits(&mut sched, &Batch::single(&tokens), &*loaded).unwrap();
        let (d, mx) = compare(&got, &want);
        println!("{name}: file vs training-time logits {d:.3e} (max {mx:.3})");
        assert!(d <= 1e-5 * mx, "{name}: {d:.3e}");
        // The last position's logits through the KV cache, token by token.
        let mut cache = gguf_peft::model::KvCache::default();
        let mut last = Vec::new();
        for (i, &t) in tokens.iter().enumerate() {
            let b = Batch {
                tokens: vec![t],
                pos: vec![i as i32],
                seq: vec![0],
                outputs: None,
            };
            let (l, c) = model.logits_cached(&mut sched, &b, &*loaded, &cache).unwrap();
            cache = c;
            last = l;
        }
        let (d, mx) = compare(&last, &want[want.len() - 1..]);
        assert!(d <= 1e-4 * mx, "{name}: cached vs full {d:.3e}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The llama.cpp route for prompt tuning: the exported virtual tokens fed
/// through `llama_batch.embd` at positions 0..n, then the tokens, give our
/// logits (bound as the foundation's: 1e-3 × max |logit|).
#[test]
fn prompt_through_llama_cpp_embedding_batch_matches() {
    let dir = tmpdir("prompt-llama-cpp");
    for (arch, ty) in [("llama", GgmlType::Q4_K), ("gemma3", GgmlType::F16)] {
        let path = synth(&dir, arch, ty);
        let model = Model::load(&path, Backend::cpu(threads())).unwrap();
        let n_embd = model.hparams.n_embd;
        let tokens = some_tokens(12, model.hparams.n_vocab, 2);
        let mut sched = model.sched();
        for (name, cfg) in [("prompt", prompt(6)), ("ptuning", ptuning(6, Encoder::Lstm))] {
            let m = cfg.build(&model, None, 4).unwrap();
            let file = dir.join(format!("{arch}-{name}.gguf"));
            m.write_adapter(&model, &file).unwrap();
            let sp = gguf_peft::export::soft_prompt::read(&file, &model).unwrap();
            let virt = sp.tokens.unwrap();
            let ours = model.logits(&mut sched, &Batch::single(&tokens), &*m).unwrap();

            let lm = LlamaModel::load(&path, false).unwrap();
            let mut ctx = lm.context(64, threads()).unwrap();
            ctx.decode_embd(&virt, n_embd, 0).unwrap();
            let theirs = ctx.decode(&tokens, 6).unwrap();
            let (d, mx) = compare(&ours, &theirs);
            let base = model.logits(&mut sched, &Batch::single(&tokens), &NoHooks).unwrap();
            let moved = compare(&ours, &base).0;
            println!(
                "{arch} {ty:?} {name}: ours vs llama.cpp {d:.3e} (max {mx:.3}); the prompt moves logits by {moved:.3}"
            );
            assert!(d <= 1e-3 * mx, "{arch} {name}: {d:.3e} > 1e-3 × {mx:.3}");
            assert!(moved > 100.0 * d, "{arch} {name}: the prompt barely changes the logits");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A prefix made of the keys and values of some tokens acts exactly as
/// those tokens placed before the sequence: prefix entries are not rotated
/// again and real tokens run at positions n_virtual.. (PEFT's semantics).
#[test]
fn prefix_of_token_keys_equals_prepended_tokens() {
    use gguf_peft::peft::prefix::{kv_of_tokens, PrefixTuning};
    let dir = tmpdir("prefix-as-text");
    for arch in ["llama", "qwen3"] {
        let path = synth(&dir, arch, GgmlType::F32);
        let model = Model::load(&path, Backend::cpu(threads())).unwrap();
        let head = some_tokens(4, model.hparams.n_vocab, 21);
        let tokens = some_tokens(9, model.hparams.n_vocab, 22);
        let cfg = PrefixConfig {
            num_virtual_tokens: head.len(),
            projection: None,
            init: PromptInit::Random,
            ptuning_v2: false,
            keep_positions: false,
            classes: Vec::new(),
        };
        let p = PrefixTuning::from_values(&model, cfg, &kv_of_tokens(&model, &head).unwrap(), None).unwrap();
        let mut sched = model.sched();
        let got = model.logits(&mut sched, &Batch::single(&tokens), &p).unwrap();
        let joined: Vec<i32> = head.iter().chain(&tokens).copied().collect();
        let all = model.logits(&mut sched, &Batch::single(&joined), &NoHooks).unwrap();
        let (d, mx) = compare(&got, &all[head.len()..]);
        println!("{arch}: prefix of token keys vs prepended tokens {d:.3e} (max {mx:.3})");
        assert!(d <= 1e-5 * mx, "{arch}: {d:.3e}");
        // Keeping real tokens at positions 0.. is another model.
        let keep = PrefixConfig {
            keep_positions: true,
            ..p.config.clone()
        };
        let k = PrefixTuning::from_values(&model, keep, &kv_of_tokens(&model, &head).unwrap(), None).unwrap();
        let other = model.logits(&mut sched, &Batch::single(&tokens), &k).unwrap();
        assert!(
            compare(&other, &all[head.len()..]).0 > 1e-3 * mx,
            "{arch}: positions made no difference"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Soft prompts cross to PEFT's format and back bit for bit (llama, whose
/// prefix keys are permuted between the GGUF and HF layouts), with PEFT's
/// tensor name, shape and config fields.
#[test]
fn peft_export_and_import_round_trip() {
    use gguf_peft::export::{peft_prompt, soft_prompt};
    let dir = tmpdir("prompt-peft");
    let path = synth(&dir, "llama", GgmlType::F32);
    let model = Model::load(&path, Backend::cpu(threads())).unwrap();
    let hp = &model.hparams;
    for (name, cfg, peft_type, width) in [
        ("prompt", prompt(5), "PROMPT_TUNING", hp.n_embd),
        ("ptuning", ptuning(5, Encoder::Mlp), "P_TUNING", hp.n_embd),
        (
            "prefix",
            prefix(5, Some(16), false),
            "PREFIX_TUNING",
            hp.n_layer * 2 * hp.n_head_kv * hp.head_dim,
        ),
    ] {
        let m = cfg.build(&model, None, 13).unwrap();
        let file = dir.join(format!("{name}.gguf"));
        m.write_adapter(&model, &file).unwrap();
        let out = dir.join(format!("{name}-peft"));
        peft_prompt::export(&file, &model, &out).unwrap();
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(cfg["peft_type"], peft_type);
        assert_eq!(cfg["num_virtual_tokens"], 5);
        assert_eq!(cfg["inference_mode"], true);
        let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.names(), vec!["prompt_embeddings"]);
        assert_eq!(st.tensor("prompt_embeddings").unwrap().shape(), &[5, width]);
        let back = dir.join(format!("{name}-back.gguf"));
        peft_prompt::import(&out, &model, &back).unwrap();
        let (a, b) = (
            soft_prompt::read(&file, &model).unwrap(),
            soft_prompt::read(&back, &model).unwrap(),
        );
        assert_eq!(a.tokens, b.tokens, "{name}");
        assert_eq!(a.prefix, b.prefix, "{name}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// P-tuning v2 with a classification head: gradients of the deep prompts
/// and of the head against central differences on labeled examples, and
/// the head read back from the adapter file gives the same class scores.
#[test]
fn classification_head_gradients_and_file() {
    let dir = tmpdir("prompt-cls");
    let path = synth(&dir, "qwen3", GgmlType::F32);
    let model = Model::load(&path, Backend::cpu(threads())).unwrap();
    let classes: Vec<String> = ["neg", "neu", "pos"].map(String::from).to_vec();
    let cfg = MethodConfig::Prefix(PrefixConfig {
        num_virtual_tokens: 3,
        projection: None,
        init: PromptInit::Random,
        ptuning_v2: true,
        keep_positions: false,
        classes: classes.clone(),
    });
    let m = cfg.build(&model, None, 17).unwrap();
    assert_eq!(m.class_labels(), Some(&classes[..]));
    let exs: Vec<Example> = [(7, 1, 0u32), (5, 2, 2)]
        .iter()
        .map(|&(len, seed, label)| Example {
            tokens: some_tokens(len, model.hparams.n_vocab, seed),
            loss: vec![false; len],
            label: Some(label),
        })
        .collect();
    let refs: Vec<&Example> = exs.iter().collect();
    let mut sched = model.sched();
    let (l0, n, _) = loss_and_grads(&model, &*m, &mut sched, &refs).unwrap();
    assert_eq!(n, 2, "one target per labeled example");
    // ln 3 for an untrained head on 3 classes.
    assert!((l0 - 3f32.ln()).abs() < 0.3, "loss {l0}");
    let (_, worst) = check_gradients("ptuning-v2 classifier", &model, &*m, &refs);
    println!("ptuning-v2 classifier: worst relative error {worst:.2e}");
    let file = dir.join("cls.gguf");
    m.write_adapter(&model, &file).unwrap();
    let loaded = load_adapter(&model, &file, 1.0).unwrap();
    assert_eq!(loaded.class_labels(), Some(&classes[..]));
    let (batch, _) = gguf_peft::train::make_batch(&refs);
    let a = model.logits(&mut sched, &batch, &*m).unwrap();
    let b = model.logits(&mut sched, &batch, &*loaded).unwrap();
    assert_eq!(a.len(), 2);
    assert_eq!(a[0].len(), 3);
    assert_eq!(compare(&a, &b).0, 0.0);
    // Language-model data on a classification adapter is refused.
    let lm = examples(model.hparams.n_vocab);
    let err = loss_and_grads(&model, &*m, &mut sched, &lm.iter().collect::<Vec<_>>()).err();
    assert!(err.is_some_and(|e| e.to_string().contains("label")));
    let _ = std::fs::remove_dir_all(dir);
}
