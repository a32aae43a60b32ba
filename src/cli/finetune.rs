//! `gguf-peft finetune`: train an adapter on the frozen (quantized) base and
//! write it in the form runtimes load (llama.cpp's LoRA GGUF, or our
//! soft-prompt GGUF for the prompt family).

use super::{progress_bar, ComputeArgs};
use crate::data::{read_records, tokenize, Example, TokenizeOptions};
use crate::peft::lora::LoraConfig;
use crate::peft::p_tuning::PTuningConfig;
use crate::peft::prefix::PrefixConfig;
use crate::peft::prompt_tuning::{PromptInit, PromptTuningConfig};
use crate::peft::MethodConfig;
use crate::rng::Rng;
use crate::train::metrics::{loss_svg, read as read_metrics, write_atomic};
use crate::train::{checkpoint, OptimConfig, Run, Schedule, TrainConfig, TrainState};
use crate::{Error, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct FinetuneArgs {
    /// Base model (GGUF, any quant type); it stays frozen in its own types.
    #[arg(short, long)]
    model: PathBuf,
    /// Training data: JSONL ({"text"}, {"prompt","completion"}, {"messages"},
    /// alpaca, or {"text","label"} to train a P-tuning v2 classifier) or a
    /// plain text file.
    #[arg(short, long)]
    data: PathBuf,
    /// Output directory (adapter.gguf, adapter_config.json, metrics.jsonl,
    /// loss.svg, checkpoints/).
    #[arg(short, long)]
    out: PathBuf,
    /// Evaluation data (same formats).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Hold out this fraction of the training data for evaluation instead.
    #[arg(long, default_value_t = 0.0)]
    eval_fraction: f32,
    /// PEFT method: `lora`, `prompt` (prompt tuning), `ptuning` (P-tuning:
    /// prompt encoder), `prefix` (prefix tuning) or `ptuning-v2` (deep
    /// prompts at every layer).
    #[arg(long, default_value = "lora", value_parser = ["lora", "prompt", "ptuning", "prefix", "ptuning-v2"])]
    method: String,
    /// Virtual tokens (prompt family): prompt length, or prefix entries per layer.
    #[arg(long, default_value_t = 20)]
    num_virtual_tokens: usize,
    /// How virtual tokens / prefixes start: `vocab` (random vocabulary
    /// tokens: their embeddings, or for prefixes their keys and values),
    /// `text` (the tokens of --init-text, likewise), `random` (standard
    /// normal, PEFT's default) or `zero`. Default: `text` when --init-text
    /// is given, else `vocab`.
    #[arg(long, value_parser = ["vocab", "random", "text", "zero"])]
    prompt_init: Option<String>,
    /// Text whose tokens start the virtual tokens (repeated or cut to length).
    #[arg(long)]
    init_text: Option<String>,
    /// P-tuning's prompt encoder.
    #[arg(long, value_enum, default_value_t = crate::peft::p_tuning::Encoder::Mlp)]
    encoder: crate::peft::p_tuning::Encoder,
    /// Hidden width of the P-tuning encoder or of the prefix projection
    /// (default: the model's embedding width).
    #[arg(long)]
    encoder_hidden_size: Option<usize>,
    /// LSTM layers of the P-tuning encoder.
    #[arg(long, default_value_t = 2)]
    encoder_num_layers: usize,
    /// Prefix tuning: train the prefixes through an MLP (Linear, tanh,
    /// Linear) that is dropped at export.
    #[arg(long)]
    prefix_projection: bool,
    /// Prefix tuning / P-tuning v2: real tokens keep positions 0.. instead of
    /// following the prefix, as PEFT places them (such adapters do not
    /// export to PEFT).
    #[arg(long)]
    prefix_keep_positions: bool,
    /// LoRA rank.
    #[arg(short = 'r', long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    /// LoRA dropout on the adapter's input.
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Comma-separated GGUF tensor kinds to adapt.
    #[arg(long, default_value = "attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down")]
    targets: String,
    /// Comma-separated block indices to adapt (default: all).
    #[arg(long)]
    layers: Option<String>,
    /// rsLoRA scaling: alpha / sqrt(rank).
    #[arg(long)]
    rslora: bool,
    /// Peak learning rate (default: 2e-4 for LoRA, 1e-2 for P-tuning and
    /// for P-tuning v2 with a classification head, 3e-2 for prompt tuning,
    /// prefix tuning and P-tuning v2).
    #[arg(long)]
    lr: Option<f32>,
    /// AdamW β1.
    #[arg(long, default_value_t = 0.9)]
    beta1: f32,
    /// AdamW β2.
    #[arg(long, default_value_t = 0.999)]
    beta2: f32,
    /// AdamW ε.
    #[arg(long, default_value_t = 1e-8)]
    adam_eps: f32,
    /// Decoupled weight decay (AdamW).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Learning-rate schedule after warmup.
    #[arg(long, value_enum, default_value_t = Schedule::Cosine)]
    schedule: Schedule,
    /// Linear warmup from 0 to --lr over this many steps.
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    /// Sequences per micro-batch.
    #[arg(short = 'b', long, default_value_t = 4)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    /// Passes over the training data.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Train this many steps (overrides --epochs).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Seed of the initialisation, data order, dropout and eval split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Truncate examples to this many tokens (count reported).
    #[arg(long, default_value_t = 512)]
    max_seq_len: usize,
    /// Pack short examples together up to --max-seq-len.
    #[arg(long)]
    pack: bool,
    /// Compute loss on prompt tokens too (default: completions / assistant turns only).
    #[arg(long)]
    train_on_prompt: bool,
    /// Evaluate every N steps (0: at the end only).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Checkpoint every N steps (0: at the end and on Ctrl-C only).
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    /// Gradient checkpointing: keep only each block's input in the forward
    /// pass and recompute the block in the backward pass (less activation
    /// memory, about one more forward pass of time).
    #[arg(long)]
    grad_checkpointing: bool,
    /// Stop after this step with a checkpoint, as if interrupted (resume later).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Continue from a checkpoint directory, or the newest one in an output directory.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// How the frozen base is held while training: `native` (the file's
    /// quant types; on the CPU the training products dequantize them
    /// exactly, except Q6_K, F16, Q2_K and Q3_K weights' forward, which
    /// rounds activations as llama.cpp does), `f32` (dequantized once at
    /// load: 4 bytes per weight, exact everywhere), `bf16` (native, with the
    /// CPU's products over the base, and attention's, taking bf16
    /// operands with F32 sums, as torch's bf16 autocast: about twice their
    /// speed on CPUs with AVX512-BF16, such as Zen 4 or Sapphire Rapids;
    /// SwiGLU's inputs are then held in bf16 too, half their memory)
    /// or `auto` (`bf16` where the CPU has AVX512-BF16, else `native`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "native", "f32", "bf16"])]
    base_compute: String,
    /// Input gradients through the frozen weights: `transposed` (on the CPU
    /// the GEMM reads Wᵀ from the weights themselves, dequantizing them in
    /// bands, and the weights stay in their plain layout; on a GPU every
    /// weight gets a transposed F16 copy made once at load, 2 bytes per
    /// weight), `transposed-q8` (Q8_0 copies of every weight: half the
    /// memory, noisier gradients), `transposed-q4` (Q4_0 copies: a quarter,
    /// gradients as noisy as a 4-bit base) or ggml's `stock` backward and
    /// kernels (no extra memory, several times slower on CPU).
    #[arg(long, default_value = "transposed", value_parser = ["transposed", "transposed-q8", "transposed-q4", "stock"])]
    backward: String,
    #[command(flatten)]
    compute: ComputeArgs,
}

fn parse_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|x| x.trim().to_owned())
        .filter(|x| !x.is_empty())
        .collect()
}

/// The JSON written as `adapter_config.json`.
#[derive(serde::Serialize, serde::Deserialize)]
struct AdapterConfig {
    base_model: PathBuf,
    #[serde(flatten)]
    method: MethodConfig,
    train: TrainConfig,
    data: PathBuf,
    eval_data: Option<PathBuf>,
    eval_fraction: f32,
    train_on_prompt: bool,
}

/// The method's configuration from the command line.
fn method_config(a: &FinetuneArgs, n_embd: usize) -> Result<MethodConfig> {
    let n = a.num_virtual_tokens;
    let hidden = a.encoder_hidden_size.unwrap_or(n_embd);
    let init = match (a.prompt_init.as_deref(), &a.init_text) {
        (Some("text") | None, Some(t)) => PromptInit::Text(t.clone()),
        (Some("text"), None) => return Err(Error::Msg("--prompt-init text needs --init-text".into())),
        (Some("random"), _) => PromptInit::Random,
        (Some("zero"), _) => PromptInit::Zero,
        _ => PromptInit::Vocab,
    };
    Ok(match a.method.as_str() {
        "prompt" => MethodConfig::Prompt(PromptTuningConfig {
            num_virtual_tokens: n,
            init,
        }),
        "ptuning" => MethodConfig::Ptuning(PTuningConfig {
            num_virtual_tokens: n,
            encoder: a.encoder,
            encoder_hidden_size: hidden,
            encoder_num_layers: a.encoder_num_layers,
        }),
        "prefix" | "ptuning-v2" => MethodConfig::Prefix(PrefixConfig {
            num_virtual_tokens: n,
            projection: a.prefix_projection.then_some(hidden),
            keep_positions: a.prefix_keep_positions,
            init,
            ptuning_v2: a.method == "ptuning-v2",
            classes: Vec::new(),
        }),
        _ => MethodConfig::Lora(LoraConfig {
            rank: a.rank,
            alpha: a.alpha,
            dropout: a.dropout,
            targets: parse_list(&a.targets),
            layers: match &a.layers {
                Some(s) => Some(
                    parse_list(s)
                        .iter()
                        .map(|x| {
                            x.parse()
                                .map_err(|_| Error::Msg(format!("--layers: '{x}' is not a block index")))
                        })
                        .collect::<Result<Vec<usize>>>()?,
                ),
                None => None,
            },
            rslora: a.rslora,
        }),
    })
}

pub fn run(a: FinetuneArgs) -> Result<()> {
    let records = read_records(&a.data)?;
    let classes = crate::data::label_set(&records);
    if !classes.is_empty() && a.method != "ptuning-v2" {
        return Err(Error::Msg(format!(
            "{}: labeled records ({{\"text\",\"label\"}}) train a classification head, which --method ptuning-v2 provides",
            a.data.display()
        )));
    }
    let backend = a.compute.backend()?;
    // `auto`: on the CPU the GEMM trains on exact products of the native
    // weights at the speed of an F32 copy, in less memory (SmolLM2 Q4_1
    // demo: identical losses, 603 MiB against 1.11 GiB), and in bf16 twice
    // as fast where the CPU has AVX512-BF16; on a GPU quantized matmuls are
    // fast and memory scarce.
    let layout = super::base_layout(&a.base_compute, &backend);
    let (mut model, tok) = super::load_with(&a.model, backend, layout)?;
    let t_bytes = super::prepare_backward(&mut model, &a.backward)?;
    eprintln!(
        "base: {} ({} base{}, {}), {} backward ({})",
        a.model.display(),
        super::layout_name(layout),
        match model.weights_repacked() {
            0 => String::new(),
            n => format!(", {n} matrices repacked for the CPU's faster kernels"),
        },
        super::inspect::human_bytes(model.weights_bytes() as u64),
        a.backward,
        match t_bytes {
            0 if a.backward.starts_with("transposed") =>
                "no copies: Wᵀ is read from the weights themselves".to_string(),
            n => format!("{} more", super::inspect::human_bytes(n as u64)),
        }
    );
    let tok_opts = TokenizeOptions {
        train_on_prompt: a.train_on_prompt,
        max_seq_len: a.max_seq_len,
        labels: classes.clone(),
    };
    let in_file = |p: &std::path::Path, e: Error| Error::Msg(format!("{}: {e}", p.display()));
    let (mut train, st) = tokenize(&records, &tok, &tok_opts).map_err(|e| in_file(&a.data, e))?;
    if train.is_empty() {
        return Err(Error::Msg(format!(
            "{}: no example has a token to train on (all {} dropped; use --train-on-prompt?)",
            a.data.display(),
            st.n_dropped
        )));
    }
    let mut eval: Vec<Example> = match &a.eval_data {
        Some(p) => {
            tokenize(&read_records(p)?, &tok, &tok_opts)
                .map_err(|e| in_file(p, e))?
                .0
        }
        None => Vec::new(),
    };
    if a.eval_data.is_none() && a.eval_fraction > 0.0 {
        if !(0.0..1.0).contains(&a.eval_fraction) {
            return Err(Error::Msg("--eval-fraction must be in [0, 1)".into()));
        }
        // A seeded split, so a resumed run holds out the same examples.
        Rng::new(a.seed ^ 0xE7A1).shuffle(&mut train);
        let n_eval = ((train.len() as f32 * a.eval_fraction).round() as usize).clamp(1, train.len() - 1);
        eval = train.split_off(train.len() - n_eval);
    }
    eprintln!(
        "data: {} training examples ({} tokens, {} with loss; {} truncated to {}, {} dropped), {} eval examples",
        train.len(),
        st.n_tokens,
        st.n_loss_tokens,
        st.n_truncated,
        a.max_seq_len,
        st.n_dropped,
        eval.len()
    );
    let mut mcfg = method_config(&a, model.hparams.n_embd)?;
    if let MethodConfig::Prefix(p) = &mut mcfg {
        p.classes = classes.clone();
        if !classes.is_empty() {
            eprintln!("classification: {} classes {:?}", classes.len(), classes);
        }
    }
    let lr = a.lr.unwrap_or(match a.method.as_str() {
        // A fresh classification head is unstable at prompt-tuning rates.
        "ptuning-v2" if !classes.is_empty() => 1e-2,
        "prompt" | "prefix" | "ptuning-v2" => 3e-2,
        "ptuning" => 1e-2,
        _ => 2e-4,
    });
    let tcfg = TrainConfig {
        optim: OptimConfig {
            lr,
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.adam_eps,
            weight_decay: a.weight_decay,
            schedule: a.schedule,
            warmup_steps: a.warmup_steps,
            max_grad_norm: a.max_grad_norm,
        },
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        epochs: a.epochs,
        max_steps: a.max_steps,
        seed: a.seed,
        pack: a.pack,
        max_seq_len: a.max_seq_len,
        eval_every: a.eval_every,
        save_every: a.save_every,
        recompute: a.grad_checkpointing,
    };
    let method = mcfg.build(&model, Some(&tok), a.seed)?;
    let method = &*method;
    let n_base: u64 = model.file.tensors().iter().map(|t| t.n_elements()).sum();
    eprintln!(
        "{}",
        crate::peft::trainable_summary(method.n_trainable() as u64, n_base)
    );
    let out = &a.out;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let state = match &a.resume {
        Some(dir) => {
            let ck = checkpoint::find(dir)?;
            let s = checkpoint::load(&ck, method)?;
            eprintln!("resuming from {} (step {})", ck.display(), s.step);
            s
        }
        None => {
            // A fresh run starts a fresh metrics file.
            let _ = std::fs::remove_file(out.join("metrics.jsonl"));
            TrainState::fresh(method, a.seed)
        }
    };
    let cfg_json = AdapterConfig {
        base_model: a.model.clone(),
        method: mcfg,
        train: tcfg.clone(),
        data: a.data.clone(),
        eval_data: a.eval_data.clone(),
        eval_fraction: a.eval_fraction,
        train_on_prompt: a.train_on_prompt,
    };
    write_atomic(
        &out.join("adapter_config.json"),
        serde_json::to_string_pretty(&cfg_json)
            .expect("serialisable")
            .as_bytes(),
    )?;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C while the checkpoint is written would be lost:
        // the handler only asks the loop to stop after the current step.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("\nstopping after this step (checkpoint being written)...");
            } else {
                eprintln!("\ninterrupt: finishing this step, then writing a checkpoint");
            }
        });
    }
    let run = Run {
        train: &train,
        eval: &eval,
        out_dir: out,
        stop: &stop,
        stop_after: a.stop_after,
    };
    let bar = progress_bar(0, "train");
    let t0 = std::time::Instant::now();
    let outcome = crate::train::train(&model, method, &tcfg, &run, state, |m, total| {
        let loss = m.loss.unwrap_or(f32::NAN);
        let line = format!(
            "step {}/{} loss {:.4} lr {:.2e} grad-norm {:.3} {:.0} tok/s{}",
            m.step,
            total,
            loss,
            m.lr.unwrap_or(0.0),
            m.grad_norm.unwrap_or(0.0),
            m.tokens_per_s.unwrap_or(0.0),
            m.eval_loss.map_or(String::new(), |e| format!(" eval {e:.4}"))
        );
        match &bar {
            Some(b) => {
                b.set_length(total as u64);
                b.set_position(m.step as u64);
                b.set_message(format!("loss {loss:.4}"));
                if m.eval_loss.is_some() {
                    b.println(line);
                }
            }
            None => eprintln!("{line}"),
        }
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let outcome = outcome?;
    let metrics = read_metrics(&out.join("metrics.jsonl"))?;
    write_atomic(&out.join("loss.svg"), loss_svg(&metrics).as_bytes())?;
    let adapter = out.join("adapter.gguf");
    method.write_adapter(&model, &adapter)?;
    let secs = t0.elapsed().as_secs_f64();
    if outcome.interrupted {
        eprintln!(
            "stopped at step {}/{} after {secs:.1} s; checkpoint {}; continue with --resume {}",
            outcome.steps_done,
            outcome.total_steps,
            outcome
                .last_checkpoint
                .as_ref()
                .map_or("-".into(), |p| p.display().to_string()),
            out.display()
        );
    } else {
        eprintln!("trained {} steps in {secs:.1} s", outcome.steps_done);
    }
    if let (Some(f), Some(l)) = (outcome.first_eval, outcome.last_eval) {
        eprintln!("eval loss {f:.4} -> {l:.4}");
    }
    println!("{}", adapter.display());
    Ok(())
}
