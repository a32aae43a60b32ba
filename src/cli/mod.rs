//! The `gguf-peft` command line.

mod bench;
mod bench_matmul;
mod convert;
mod finetune;
mod inspect;
mod merge;
mod quantize;

use crate::generate::SamplingOptions;
use crate::ggml::Backend;
use crate::model::{Model, NoHooks};
use crate::tokenizer::{Message, Tokenizer};
use crate::{Error, Result};
use clap::{Args, Parser, Subcommand};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

/// Fine-tune LLMs with parameter-efficient methods directly on GGUF files.
#[derive(Parser, Debug)]
#[command(name = "gguf-peft", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show a GGUF model's architecture, hyperparameters and tensors.
    Inspect(inspect::InspectArgs),
    /// Generate text with our own graph (greedy at --temp 0).
    Generate(GenerateArgs),
    /// Mean token NLL and perplexity over a text or JSONL file (accuracy with a classifier adapter).
    Eval(EvalArgs),
    /// Train an adapter (LoRA, prompt / P- / prefix tuning, P-tuning v2) on the frozen GGUF base.
    Finetune(Box<finetune::FinetuneArgs>),
    /// Forward and training throughput, train/forward ratio and peak memory.
    Bench(bench::BenchArgs),
    /// Merge LoRA adapters into the base model, keeping its quant types.
    Merge(merge::MergeArgs),
    /// Requantize a model to another ggml type.
    Quantize(quantize::QuantizeArgs),
    /// Export a GGUF LoRA adapter or soft prompt in another format (HF PEFT).
    Export(convert::ExportArgs),
    /// Convert a HF PEFT adapter (LoRA or prompt learning) to our GGUF formats.
    ImportAdapter(convert::ImportArgs),
    /// Convert a HF checkpoint (safetensors, incl. bitsandbytes NF4) to GGUF.
    Convert(convert::ConvertArgs),
    /// List the compute devices of this build (names for --device).
    Devices,
}

/// Options to apply a trained adapter.
#[derive(Args, Debug, Clone)]
pub struct AdapterArgs {
    /// Adapter from `finetune`: a LoRA in llama.cpp's GGUF format, or a soft
    /// prompt / prefix GGUF.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Multiplier of a LoRA adapter's effect.
    #[arg(long, default_value_t = 1.0)]
    adapter_scale: f32,
}

impl AdapterArgs {
    /// The adapter as hooks, or the base model's.
    fn hooks(&self, model: &Model) -> Result<Box<dyn crate::model::Hooks>> {
        Ok(match &self.adapter {
            Some(p) => crate::peft::load_adapter(model, p, self.adapter_scale)?,
            None => Box::new(NoHooks),
        })
    }
}

/// Options every compute command takes.
#[derive(Args, Debug, Clone)]
pub struct ComputeArgs {
    #[command(flatten)]
    threads: ThreadsArgs,
    /// Compute device: `auto` (the first GPU of this build, else the CPU),
    /// `cpu`, or a ggml device name such as CUDA0, Vulkan0, Metal. On a
    /// GPU, ops it cannot run go to the CPU with --threads threads.
    #[arg(long, default_value = "auto")]
    device: String,
}

impl ComputeArgs {
    fn threads(&self) -> usize {
        self.threads.get()
    }

    /// The backend for --device and --threads (rayon's pool, for load-time
    /// conversions and transposed copies, gets as many threads).
    fn backend(&self) -> Result<std::sync::Arc<Backend>> {
        self.threads.apply();
        let cpus = std::thread::available_parallelism().map_or(usize::MAX, |n| n.get());
        if self.threads() > cpus {
            // ggml's threads spin at each node's end waiting for the rest:
            // a thread without a CPU of its own stalls them all (the demo's
            // steps ran 15× slower on 3 threads over 2 CPUs).
            eprintln!(
                "warning: --threads {} is more than the {cpus} CPUs this process may use; expect a many times slower run (use --threads {cpus} or fewer)",
                self.threads()
            );
        }
        Ok(Backend::open(&self.device, self.threads())?)
    }
}

/// `--threads`, on every command that computes: ggml's threads (with
/// [`ComputeArgs`]) and rayon's (tensor conversions of merge, quantize,
/// convert, load-time copies).
#[derive(Args, Debug, Clone)]
pub struct ThreadsArgs {
    /// CPU threads (default: number of physical cores).
    #[arg(short = 't', long)]
    threads: Option<usize>,
}

impl ThreadsArgs {
    /// --threads (default: physical cores).
    fn get(&self) -> usize {
        self.threads.unwrap_or_else(num_cpus::get_physical).max(1)
    }

    /// Sizes rayon's global pool to --threads. Once per process: a later
    /// call (the library used twice in one process) leaves the first size.
    pub fn apply(&self) {
        let _ = rayon::ThreadPoolBuilder::new().num_threads(self.get()).build_global();
    }
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// GGUF model file.
    #[arg(short, long)]
    model: PathBuf,
    /// Prompt text.
    #[arg(short, long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    system: Option<String>,
    /// Maximum new tokens.
    #[arg(short = 'n', long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.0)]
    temperature: f32,
    /// Top-k sampling (0: off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Top-p (nucleus) sampling (1: off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the rendered prompt and its token count to stderr first.
    #[arg(long)]
    verbose_prompt: bool,
    #[command(flatten)]
    adapter: AdapterArgs,
    #[command(flatten)]
    compute: ComputeArgs,
}

#[derive(Args, Debug)]
struct EvalArgs {
    /// GGUF model file.
    #[arg(short, long)]
    model: PathBuf,
    /// Text file, or JSONL with text / prompt+completion / messages records
    /// ({"text","label"} records with a classifier adapter).
    #[arg(short, long)]
    data: PathBuf,
    /// Tokens per evaluation window; longer texts are cut into windows.
    #[arg(short = 'c', long, default_value_t = 512)]
    ctx_size: usize,
    /// Print a JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    adapter: AdapterArgs,
    #[command(flatten)]
    compute: ComputeArgs,
}

/// Parses arguments and runs the command; errors are printed as one line.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Generate(a) => generate(a),
        Command::Eval(a) => eval(a),
        Command::Finetune(a) => finetune::run(*a),
        Command::Bench(a) => bench::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Export(a) => convert::export(a),
        Command::ImportAdapter(a) => convert::import(a),
        Command::Convert(a) => convert::convert(a),
        Command::Devices => {
            list_devices();
            Ok(())
        }
    }
}

/// Prints the build's compute devices, marking the one `--device auto` picks.
fn list_devices() {
    let auto = crate::ggml::default_gpu().map_or_else(|| "CPU".to_string(), |d| d.name);
    let mut out = String::new();
    for d in crate::ggml::devices() {
        let mem = if d.memory.0 > 0 {
            format!(
                ", {} free of {}",
                inspect::human_bytes(d.memory.1 as u64),
                inspect::human_bytes(d.memory.0 as u64)
            )
        } else {
            String::new()
        };
        let mark = if d.name == auto { "  (auto)" } else { "" };
        let kind = match d.kind {
            crate::ggml::DeviceKind::Cpu => "CPU",
            crate::ggml::DeviceKind::Gpu => "GPU",
            crate::ggml::DeviceKind::IntegratedGpu => "integrated GPU",
            crate::ggml::DeviceKind::Accelerator => "accelerator",
        };
        out.push_str(&format!("{:10} {kind}: {}{mem}{mark}\n", d.name, d.description));
    }
    print_stdout(&out);
}

/// Loads a model (in its own types) and its tokenizer on the --device backend.
pub(crate) fn load(path: &std::path::Path, compute: &ComputeArgs) -> Result<(Model, Tokenizer)> {
    load_with(path, compute.backend()?, crate::model::WeightLayout::Native)
}

/// The layout `--base-compute` names: `auto` is `bf16` on a CPU whose
/// products run in bf16 (AVX512-BF16: about twice the speed of exact F32
/// products, with the operands rounded as torch's bf16 autocast or QLoRA's
/// bf16 compute dtype round them), else `native`.
pub(crate) fn base_layout(choice: &str, backend: &Backend) -> crate::model::WeightLayout {
    use crate::model::WeightLayout;
    let bf16 = backend.is_cpu() && crate::ggml::bf16_products_supported();
    match choice {
        "f32" => WeightLayout::F32,
        "bf16" => {
            if !bf16 {
                eprintln!(
                    "note: --base-compute bf16 takes effect on CPUs with AVX512-BF16 only; here it runs as native"
                );
            }
            WeightLayout::Bf16
        }
        "native" => WeightLayout::Native,
        _ if bf16 => WeightLayout::Bf16,
        _ => WeightLayout::Native,
    }
}

/// How `--base-compute` names `layout`.
pub(crate) fn layout_name(layout: crate::model::WeightLayout) -> &'static str {
    use crate::model::WeightLayout;
    match layout {
        WeightLayout::Native => "native",
        WeightLayout::F32 => "f32",
        WeightLayout::Bf16 => "bf16",
    }
}

/// Loads a model in `layout` and its tokenizer on `backend`.
pub(crate) fn load_with(
    path: &std::path::Path,
    backend: std::sync::Arc<Backend>,
    layout: crate::model::WeightLayout,
) -> Result<(Model, Tokenizer)> {
    if !path.exists() {
        return Err(Error::Msg(format!("{}: no such file", path.display())));
    }
    let model = Model::load_with(path, backend, layout)?;
    let tok = Tokenizer::load(path, &model.file)?;
    Ok((model, tok))
}

fn generate(a: GenerateArgs) -> Result<()> {
    let (model, tok) = load(&a.model, &a.compute)?;
    let hooks = a.adapter.hooks(&model)?;
    let text = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
        msgs.push(Message {
            role: "user".into(),
            content: a.prompt.clone(),
        });
        tok.apply_chat_template(&msgs, true)?
    } else {
        a.prompt.clone()
    };
    let prompt = tok.encode(&text, true);
    if a.verbose_prompt {
        eprintln!("prompt ({} tokens):\n{text}\n---", prompt.len());
    }
    if let Some(classes) = hooks.class_labels() {
        // A classification adapter labels the prompt instead of continuing it.
        let mut sched = model.sched();
        let p = &crate::eval::classify(&model, &mut sched, hooks.as_ref(), &[prompt], |_, _| {})?[0];
        let best = crate::generate::argmax(p);
        println!("{}", classes[best]);
        let all: Vec<String> = classes.iter().zip(p).map(|(c, q)| format!("{c} {q:.4}")).collect();
        eprintln!("[class probabilities: {}]", all.join(", "));
        return Ok(());
    }
    let opts = SamplingOptions {
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    let mut sched = model.sched();
    let mut out = std::io::stdout().lock();
    if !a.chat {
        let _ = write!(out, "{}", a.prompt);
    }
    // Decode incrementally so multi-byte characters split over tokens print whole.
    let mut shown = 0usize;
    let mut toks = Vec::new();
    let t0 = std::time::Instant::now();
    let generated = crate::generate::generate(
        &model,
        &mut sched,
        hooks.as_ref(),
        &prompt,
        &opts,
        |t| tok.is_eog(t),
        |t| {
            toks.push(t);
            let bytes = tok.decode_bytes(&toks);
            // Print only whole characters; a split one waits for its next token.
            let valid = match std::str::from_utf8(&bytes[shown..]) {
                Ok(s) => s.len(),
                Err(e) if e.error_len().is_none() => e.valid_up_to(),
                Err(_) => bytes.len() - shown,
            };
            let _ = write!(out, "{}", String::from_utf8_lossy(&bytes[shown..shown + valid]));
            let _ = out.flush();
            shown += valid;
        },
    )?;
    let _ = writeln!(out);
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "[{} prompt tokens, {} generated in {:.2} s, {:.1} tokens/s]",
        prompt.len(),
        generated.len(),
        secs,
        generated.len() as f64 / secs.max(1e-9)
    );
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let (model, tok) = load(&a.model, &a.compute)?;
    let hooks = a.adapter.hooks(&model)?;
    let records = crate::data::read_records(&a.data)?;
    if let Some(classes) = hooks.class_labels() {
        return eval_classes(&a, &model, &tok, hooks.as_ref(), classes, &records);
    }
    let mut seqs = Vec::new();
    for r in &records {
        seqs.push(tok.encode(&r.render(&tok)?, true));
    }
    let mut sched = model.sched();
    let bar = progress_bar(crate::eval::windows(&seqs, a.ctx_size).len() as u64, "eval");
    let rep = crate::eval::evaluate(&model, &mut sched, hooks.as_ref(), &seqs, a.ctx_size, |i, _| {
        if let Some(b) = &bar {
            b.set_position(i as u64)
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if a.json {
        println!("{}", serde_json::to_string(&rep).expect("serialisable"));
    } else {
        println!(
            "{}: {} tokens scored in {} windows of ≤{}: mean NLL {:.4}, perplexity {:.4}",
            a.data.display(),
            rep.n_scored,
            rep.n_windows,
            rep.ctx_size,
            rep.mean_nll,
            rep.perplexity
        );
    }
    Ok(())
}

/// `eval` with a classification adapter: accuracy and mean NLL of the
/// labeled records.
fn eval_classes(
    a: &EvalArgs,
    model: &Model,
    tok: &crate::tokenizer::Tokenizer,
    hooks: &dyn crate::model::Hooks,
    classes: &[String],
    records: &[crate::data::Record],
) -> Result<()> {
    let (mut seqs, mut labels) = (Vec::new(), Vec::new());
    for (i, r) in records.iter().enumerate() {
        let crate::data::Record::Labeled { text, label } = r else {
            return Err(Error::Msg(format!(
                "{}: record {} has no label; a classification adapter evaluates {{\"text\",\"label\"}} records",
                a.data.display(),
                i + 1
            )));
        };
        let k = classes.iter().position(|c| c == label).ok_or_else(|| {
            Error::Msg(format!(
                "{}: record {}: label '{label}' is not one of the adapter's {classes:?}",
                a.data.display(),
                i + 1
            ))
        })?;
        seqs.push(tok.encode(text, true));
        labels.push(k);
    }
    let mut sched = model.sched();
    let probs = with_progress("classify", |cb| {
        crate::eval::classify(model, &mut sched, hooks, &seqs, cb)
    })?;
    let rep = crate::eval::class_report(&probs, &labels);
    if a.json {
        println!("{}", serde_json::to_string(&rep).expect("serialisable"));
    } else {
        println!(
            "{}: {} examples, accuracy {:.4}, mean NLL {:.4}",
            a.data.display(),
            rep.n_examples,
            rep.accuracy,
            rep.mean_nll
        );
    }
    Ok(())
}

/// Makes the transposed weight copies `--backward` asks for; returns their
/// bytes (0 for ggml's stock backward). Then matrices of types this CPU
/// repacks move into its repacking buffer, unless the copies left the
/// weights plain for the CPU's GEMM (`transposed`, see
/// [`Model::prepare_transposed`]); the stock backward is ggml's throughout
/// (its OUT_PROD reads the weights in their plain layout, and ggml's
/// kernels replace the GEMM).
pub(crate) fn prepare_backward(model: &mut Model, backward: &str) -> Result<usize> {
    use crate::ggml::GgmlType;
    let bytes = match backward {
        "transposed" => model.prepare_transposed(None)?,
        "transposed-q8" => model.prepare_transposed(Some(GgmlType::Q8_0))?,
        "transposed-q4" => model.prepare_transposed(Some(GgmlType::Q4_0))?,
        _ => 0,
    };
    // Repacking after the copies, which read the mapped originals that
    // repacking then gives back.
    if backward != "stock" {
        model.repack_weights();
    } else {
        model.gemm_products = false;
    }
    Ok(bytes)
}

/// Writes to stdout; a closed pipe (`| head`) ends output quietly.
pub(crate) fn print_stdout(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(s.as_bytes()).and_then(|_| out.flush());
}

/// Runs `f` with a progress callback `(done, total)` drawn as a bar on a
/// TTY (nothing otherwise), and clears the bar afterwards.
pub(crate) fn with_progress<T>(what: &str, f: impl FnOnce(&mut dyn FnMut(usize, usize)) -> T) -> T {
    let bar = progress_bar(0, what);
    let mut cb = |i: usize, n: usize| {
        if let Some(b) = &bar {
            b.set_length(n as u64);
            b.set_position(i as u64);
        }
    };
    let r = f(&mut cb);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    r
}

/// A progress bar on a TTY, nothing otherwise.
pub(crate) fn progress_bar(len: u64, what: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
            .expect("valid template"),
    );
    b.set_message(what.to_owned());
    Some(b)
}
