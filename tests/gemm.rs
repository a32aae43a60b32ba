//! The GEMM that runs F32 products on the CPU (`Graph::gemm_products`)
//! against a plain f64 loop and against ggml's own kernels, on the layouts
//! training produces: permuted and transposed views, grouped-query
//! broadcast, short sums (LoRA rank), few result columns, input gradients
//! through quantized weights dequantized on the fly; and forward
//! logits over a quantized base, which keep ggml's kernels.

mod common;
use common::*;
use gguf_peft::ggml::{Backend, Context, GgmlType, Graph, Sched, Tensor};
use gguf_peft::model::{Batch, Model, NoHooks, WeightLayout};
use gguf_peft::rng::Rng;

/// A product over views of the inputs: `(outer, a, b, result)`, where
/// `outer` is OUT_PROD (`Σ_k a[i,k]·b[j,k]`), else MUL_MAT (`Σ_k a[k,i]·b[k,j]`).
type Built<'a> = (bool, Tensor<'a>, Tensor<'a>, Tensor<'a>);
type Build = for<'a> fn(&'a Context, &[Tensor<'a>]) -> Built<'a>;
/// A named product over inputs of these types and shapes.
type Case = (&'static str, Vec<(GgmlType, [i64; 4])>, Build);

/// The product's result, on random inputs of `shapes`, with the GEMM on or
/// off, and the f64 loop's result from the operands' logical values.
fn run(inputs: &[(GgmlType, [i64; 4])], gemm: bool, build: Build) -> (Vec<f32>, Vec<f64>) {
    run_rounded(inputs, gemm, build, None)
}

/// [`run`]; where `bf16` gives a rounding, the first input is marked for
/// bf16 products and the loop sums over operands passed through it.
fn run_rounded(
    inputs: &[(GgmlType, [i64; 4])],
    gemm: bool,
    build: Build,
    bf16: Option<fn(f32) -> f64>,
) -> (Vec<f32>, Vec<f64>) {
    let backend = Backend::cpu(threads());
    let ctx = Context::new(64, 64, false);
    let ins: Vec<Tensor> = inputs
        .iter()
        .map(|(ty, ne)| ctx.new_tensor(*ty, ne).set_input())
        .collect();
    if bf16.is_some() {
        ins[0].set_bf16_products();
    }
    let (outer, a, b, out) = build(&ctx, &ins);
    out.set_output();
    let mut g = ctx.new_graph(64, false);
    g.build_forward(out);
    if gemm {
        assert_eq!(g.gemm_products(), 1, "the product is rewritten");
    }
    let mut sched = Sched::new(std::slice::from_ref(&backend), 64);
    sched.alloc(&g).unwrap();
    fill(&ins);
    sched.compute(&g).unwrap();
    let round = bf16.unwrap_or(|x| x as f64);
    (out.read_f32(), reference_rounded(outer, a, b, out.ne(), round))
}

/// Random normal values (quantized where the input is).
fn fill(ins: &[Tensor<'_>]) {
    let mut rng = Rng::new(5);
    for t in ins {
        let v: Vec<f32> = (0..t.n_elements()).map(|_| rng.normal()).collect();
        match t.ty() {
            GgmlType::F32 => t.write_f32(&v),
            ty => t.write_bytes(&ty.from_f32(&v, t.ne()[0] as usize)),
        }
    }
}

/// A tensor's logical values (a quantized one's dequantized).
fn values(t: Tensor<'_>) -> Vec<f32> {
    match t.ty() {
        GgmlType::F32 => t.read_f32(),
        ty => ty.to_f32(&t.read_bytes(), t.n_elements()),
    }
}

/// Builds `loss`'s forward and backward graph, rewrites it for the CPU's
/// training kernels when `rewrite` (returning how many nodes it rewrote),
/// allocates it, lets `fill` write the inputs and runs it; the scheduler
/// holds the results.
fn run_backward<'a>(
    ctx: &'a Context,
    loss: Tensor<'a>,
    rewrite: bool,
    fill: impl FnOnce(),
) -> (Graph<'a>, Sched, usize) {
    let (gr, sched, rewritten, _) = run_backward_remat(ctx, loss, rewrite, false, fill);
    (gr, sched, rewritten)
}

/// [`run_backward`], rematerializing (`remat`) before the rewrite; also
/// returns how many values were recomputed.
fn run_backward_remat<'a>(
    ctx: &'a Context,
    loss: Tensor<'a>,
    rewrite: bool,
    remat: bool,
    fill: impl FnOnce(),
) -> (Graph<'a>, Sched, usize, usize) {
    run_backward_remat_on(threads(), ctx, loss, (rewrite, remat), fill)
}

/// [`run_backward_remat`] on `n_threads` threads.
fn run_backward_remat_on<'a>(
    n_threads: usize,
    ctx: &'a Context,
    loss: Tensor<'a>,
    (rewrite, remat): (bool, bool),
    fill: impl FnOnce(),
) -> (Graph<'a>, Sched, usize, usize) {
    let backend = Backend::cpu(n_threads);
    let mut gr = ctx.new_graph(64, true);
    gr.build_forward(loss);
    gr.build_backward(ctx);
    let recomputed = if remat { gr.rematerialize(ctx) } else { 0 };
    let rewritten = if rewrite { gr.gemm_products() } else { 0 };
    let mut sched = Sched::new(std::slice::from_ref(&backend), 64);
    sched.alloc(&gr).unwrap();
    // Memory no node writes reads as NaN, not as fresh pages' zeros.
    gr.poison_compute_buffers();
    fill();
    gr.reset();
    sched.compute(&gr).unwrap();
    (gr, sched, rewritten, recomputed)
}

/// The product by definition, `a` broadcast over dims 2 and 3 (GQA), over
/// the operands' values passed through `round`.
fn reference_rounded(outer: bool, a: Tensor<'_>, b: Tensor<'_>, ne: [i64; 4], round: fn(f32) -> f64) -> Vec<f64> {
    let (av, bv, an, bn) = (values(a), values(b), a.ne(), b.ne());
    let at =
        |v: &[f32], n: [i64; 4], i: [i64; 4]| round(v[(i[0] + n[0] * (i[1] + n[1] * (i[2] + n[2] * i[3]))) as usize]);
    let k = if outer { an[1] } else { an[0] };
    let (r2, r3) = (ne[2] / an[2], ne[3] / an[3]);
    let mut out = Vec::new();
    for i3 in 0..ne[3] {
        for i2 in 0..ne[2] {
            for j in 0..ne[1] {
                for i in 0..ne[0] {
                    let (a2, a3) = (i2 / r2, i3 / r3);
                    out.push(
                        (0..k)
                            .map(|kk| {
                                if outer {
                                    at(&av, an, [i, kk, a2, a3]) * at(&bv, bn, [j, kk, i2, i3])
                                } else {
                                    at(&av, an, [kk, i, a2, a3]) * at(&bv, bn, [kk, j, i2, i3])
                                }
                            })
                            .sum(),
                    );
                }
            }
        }
    }
    out
}

/// A frozen weight marked for bf16 products gives, through the packed GEMM,
/// the f64 sums of its values and the other operand's rounded to bf16
/// (`half`'s rounding, to nearest even) within F32 summation error, both
/// ways round (the forward `W·x`, the input gradient `Wᵀ·dy`): sums over
/// two passes, an odd number of terms (a pair padded with zero), edge
/// tiles, either layout of dy. Plain F32 sums miss the bound by two
/// orders of magnitude, so the rounding is seen to happen.
#[test]
fn bf16_products_match_a_loop_over_rounded_operands() {
    if !gguf_peft::ggml::bf16_products_supported() {
        eprintln!("skipped: this CPU has no AVX512-BF16 (the products stay F32, tested elsewhere)");
        return;
    }
    const Q4_1: GgmlType = GgmlType::Q4_1;
    const F32: GgmlType = GgmlType::F32;
    let round: fn(f32) -> f64 = |x| half::bf16::from_f32(x).to_f64();
    let cases: [Case; 6] = [
        (
            "forward, Q4_1",
            vec![(Q4_1, [832, 45, 1, 1]), (F32, [832, 41, 1, 1])],
            plain,
        ),
        (
            "forward, BF16, odd sum",
            vec![(GgmlType::BF16, [45, 37, 1, 1]), (F32, [45, 36, 1, 1])],
            plain,
        ),
        (
            "input gradient, Q4_1",
            vec![(Q4_1, [64, 832, 1, 1]), (F32, [832, 41, 1, 1])],
            input_grad,
        ),
        (
            "input gradient, F16, odd sum",
            vec![(GgmlType::F16, [37, 45, 1, 1]), (F32, [45, 36, 1, 1])],
            input_grad,
        ),
        (
            "input gradient, Q8_0",
            vec![(GgmlType::Q8_0, [96, 300, 1, 1]), (F32, [300, 40, 1, 1])],
            input_grad,
        ),
        // dy's rows (each term's columns) contiguous.
        (
            "input gradient, dy untransposed",
            vec![(Q4_1, [64, 832, 1, 1]), (F32, [41, 832, 1, 1])],
            lora_a_grad,
        ),
    ];
    for (case, inputs, build) in cases {
        let (got, want) = run_rounded(&inputs, true, build, Some(round));
        let rms = (want.iter().map(|w| w * w).sum::<f64>() / want.len() as f64).sqrt();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(&g, w)| (g as f64 - w).abs() / rms)
            .fold(0f64, worse);
        assert!(worst < 1e-5, "{case}: off by {worst:e} of the rms {rms}");
    }
}

/// Attention scores: keys `[hd, kv heads, tokens]` and queries `[hd, heads,
/// tokens]` permuted to `[hd, tokens, heads]`, keys broadcast to 3× heads.
fn scores<'a>(c: &'a Context, x: &[Tensor<'a>]) -> Built<'a> {
    let (k, q) = (c.permute(x[0], [0, 2, 1, 3]), c.permute(x[1], [0, 2, 1, 3]));
    (false, k, q, c.mul_mat(k, q))
}

/// A plain product (a LoRA B product: sums of r = 8 terms; a weight's forward).
fn plain<'a>(c: &'a Context, x: &[Tensor<'a>]) -> Built<'a> {
    (false, x[0], x[1], c.mul_mat(x[0], x[1]))
}

/// A LoRA A gradient: few result columns (split by rows between threads).
fn lora_a_grad<'a>(c: &'a Context, x: &[Tensor<'a>]) -> Built<'a> {
    (true, x[0], x[1], c.out_prod(x[0], x[1]))
}

/// An input gradient as ggml's backward builds it: `out_prod(W, dyᵀ)`,
/// the transposed view read through its strides.
fn input_grad<'a>(c: &'a Context, x: &[Tensor<'a>]) -> Built<'a> {
    let dyt = c.transpose(x[1]);
    (true, x[0], dyt, c.out_prod(x[0], dyt))
}

#[test]
fn gemm_matches_a_loop_and_ggml() {
    const F16: GgmlType = GgmlType::F16;
    const F32: GgmlType = GgmlType::F32;
    const Q4_1: GgmlType = GgmlType::Q4_1;
    const Q4_K: GgmlType = GgmlType::Q4_K;
    const Q8_0: GgmlType = GgmlType::Q8_0;
    const BF16: GgmlType = GgmlType::BF16;
    let cases: [Case; 19] = [
        (
            "attention scores",
            vec![(F32, [64, 3, 40, 1]), (F32, [64, 9, 40, 1])],
            scores,
        ),
        // LoRA's products (one dimension the rank; odd sizes for the
        // vector loops' tails): forward A and B, the gradients of A and B,
        // and both parts of the input gradient.
        ("lora A", vec![(F32, [45, 8, 1, 1]), (F32, [45, 41, 1, 1])], plain),
        ("lora B", vec![(F32, [8, 48, 1, 1]), (F32, [8, 40, 1, 1])], plain),
        (
            "lora B, rank 3",
            vec![(F32, [3, 77, 1, 1]), (F32, [3, 40, 1, 1])],
            plain,
        ),
        (
            "lora A gradient",
            vec![(F32, [45, 40, 1, 1]), (F32, [8, 40, 1, 1])],
            lora_a_grad,
        ),
        (
            "lora B gradient",
            vec![(F32, [8, 41, 1, 1]), (F32, [45, 41, 1, 1])],
            lora_a_grad,
        ),
        (
            "lora input gradient through A",
            vec![(F32, [45, 8, 1, 1]), (F32, [8, 41, 1, 1])],
            input_grad,
        ),
        (
            "lora input gradient through B",
            vec![(F32, [5, 45, 1, 1]), (F32, [45, 41, 1, 1])],
            input_grad,
        ),
        (
            "input gradient",
            vec![(F32, [40, 56, 1, 1]), (F32, [56, 100, 1, 1])],
            input_grad,
        ),
        // An attention value's gradient: B's rows contiguous, sums of 420
        // terms in two passes, columns enough for up to four threads.
        (
            "outer product, long sums",
            vec![(F32, [70, 420, 1, 1]), (F32, [100, 420, 1, 1])],
            lora_a_grad,
        ),
        // Through quantized (and F16) weights, dequantized in bands of rows
        // (300 rows: one full band of 256 and a partial one).
        (
            "input gradient, Q4_1 W",
            vec![(Q4_1, [96, 300, 1, 1]), (F32, [300, 40, 1, 1])],
            input_grad,
        ),
        (
            "input gradient, Q4_K W",
            vec![(Q4_K, [512, 40, 1, 1]), (F32, [40, 36, 1, 1])],
            input_grad,
        ),
        (
            "input gradient, Q8_0 W",
            vec![(Q8_0, [64, 48, 1, 1]), (F32, [48, 40, 1, 1])],
            input_grad,
        ),
        (
            "input gradient, F16 W",
            vec![(F16, [40, 56, 1, 1]), (F32, [56, 48, 1, 1])],
            input_grad,
        ),
        // The forward through a Q4_1 weight (300 rows: bands of 256).
        (
            "forward, Q4_1 W",
            vec![(Q4_1, [96, 300, 1, 1]), (F32, [96, 40, 1, 1])],
            plain,
        ),
        (
            "forward, Q4_K W",
            vec![(Q4_K, [512, 40, 1, 1]), (F32, [512, 36, 1, 1])],
            plain,
        ),
        (
            "forward, BF16 W",
            vec![(BF16, [64, 40, 1, 1]), (F32, [64, 36, 1, 1])],
            plain,
        ),
        // Sums split into passes whose lengths are no multiple of 8, result
        // rows and columns no multiple of the register tile (16 × 6).
        (
            "forward, BF16 W, long sums",
            vec![(BF16, [420, 37, 1, 1]), (F32, [420, 43, 1, 1])],
            plain,
        ),
        (
            "input gradient, F16 W, long sums",
            vec![(F16, [37, 530, 1, 1]), (F32, [530, 43, 1, 1])],
            input_grad,
        ),
    ];
    for (name, shapes, build) in cases {
        let (gemm, want) = run(&shapes, true, build);
        let (stock, want_stock) = run(&shapes, false, build);
        assert_eq!(want, want_stock, "{name}: same inputs both times");
        let worst = |got: &[f32]| {
            assert_eq!(got.len(), want.len());
            got.iter()
                .zip(&want)
                .map(|(g, w)| (*g as f64 - w).abs())
                .fold(0f64, worse)
        };
        let (wg, ws) = (worst(&gemm), worst(&stock));
        println!("{name}: worst |Δ| vs the f64 loop: GEMM {wg:.2e}, ggml {ws:.2e}");
        // Both at float rounding of sums of up to 300 terms, except ggml's
        // forward through a quantized W, which rounds the activations to
        // 8 bits per block first (the GEMM multiplies them exactly).
        assert!(wg < 1e-4, "{name}: {wg:.2e}");
        if name.starts_with("forward") {
            assert!(ws > 100.0 * wg && ws < 1.0, "{name}: ggml {ws:.2e}");
        } else {
            assert!(ws < 1e-4, "{name}: ggml {ws:.2e}");
        }
    }
}

/// Forward logits over a quantized base stay bit-identical to ggml's
/// kernels (llama.cpp's logits): a quantized matmul rounds its input per
/// block, and the GEMM's summation order flips enough of those roundings on
/// real models to move logits by percents. Over F32 weights the GEMM runs
/// and only float rounding differs.
#[test]
fn forward_over_a_quantized_base_keeps_ggml_kernels() {
    let dir = tmpdir("gemm-forward");
    for ty in [GgmlType::Q4_K, GgmlType::F32] {
        let path = synth(&dir, "llama", ty);
        let logits = |gemm: bool| {
            let mut model = Model::load_with(&path, Backend::cpu(threads()), WeightLayout::Native).unwrap();
            model.gemm_products = gemm;
            let tokens = some_tokens(48, model.hparams.n_vocab, 6);
            model
                .logits(&mut model.sched(), &Batch::single(&tokens), &NoHooks)
                .unwrap()
        };
        let (d, m) = compare(&logits(true), &logits(false));
        println!("{ty} base: forward logits GEMM on vs off: max |Δ| {d:.2e} of {m:.2}");
        if ty == GgmlType::F32 {
            assert!(d > 0.0 && d < 1e-4 * m, "{d:.2e}");
        } else {
            assert_eq!(d, 0.0);
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// `logits_as_trained` (a training run's eval loss) multiplies quantized
/// weights exactly: over a Q4_1 / Q4_K base it gives the logits of the same
/// file dequantized to F32 at load, up to float rounding, where `logits`
/// (ggml's kernels, 8-bit activations, as llama.cpp) lands much further.
#[test]
fn logits_as_trained_match_the_dequantized_base() {
    let dir = tmpdir("gemm-as-trained");
    for ty in [GgmlType::Q4_1, GgmlType::Q4_K] {
        let path = synth(&dir, "llama", ty);
        let load = |layout| Model::load_with(&path, Backend::cpu(threads()), layout).unwrap();
        let (native, exact) = (load(WeightLayout::Native), load(WeightLayout::F32));
        let batch = Batch::single(&some_tokens(48, native.hparams.n_vocab, 6));
        let want = exact.logits(&mut exact.sched(), &batch, &NoHooks).unwrap();
        let trained = native.logits_as_trained(&mut native.sched(), &batch, &NoHooks).unwrap();
        let kernels = native.logits(&mut native.sched(), &batch, &NoHooks).unwrap();
        let (d, m) = compare(&trained, &want);
        let (dk, _) = compare(&kernels, &want);
        println!("{ty}: as trained vs dequantized {d:.2e} of {m:.2}; ggml's kernels {dk:.2e}");
        assert!(d < 1e-4 * m, "{ty}: {d:.2e}");
        assert!(dk > 20.0 * d, "{ty}: ggml's kernels {dk:.2e}, as trained {d:.2e}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// `bench --json` on a quantized and an F32 base: sane figures; over
/// quantized weights it also times the forward with the training step's
/// kernels and takes the train / forward ratio against that one.
#[test]
fn bench_reports_the_forward_with_training_kernels() {
    let dir = tmpdir("gemm-bench");
    for (ty, quantized) in [(GgmlType::Q8_0, true), (GgmlType::F32, false)] {
        let path = synth(&dir, "llama", ty);
        let t = threads().to_string();
        let args = [
            "bench",
            "--model",
            path.to_str().unwrap(),
            "--tokens",
            "48",
            "--steps",
            "1",
            "--json",
            "-t",
            &t,
        ];
        let (ok, out, err) = run_cli(&args);
        assert!(ok, "{err}");
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        let num = |k: &str| j[k].as_f64().unwrap_or_else(|| panic!("{k} in {out}"));
        for k in ["forward_tokens_per_s", "train_tokens_per_s", "train_over_forward"] {
            assert!(num(k).is_finite() && num(k) > 0.0, "{k}: {out}");
        }
        let fwd = j["forward_training_kernels_tokens_per_s"].as_f64();
        assert_eq!(fwd.is_some(), quantized, "{out}");
        let ratio_to = fwd.unwrap_or(num("forward_tokens_per_s"));
        let want = ratio_to / num("train_tokens_per_s");
        assert!((num("train_over_forward") - want).abs() <= 1e-6 * want, "{out}");
        println!("{ty}: {out}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// `bench --matmul-types` times the three input-gradient paths of one
/// frozen weight per type (stock OUT_PROD, transposed F16 copy, GEMM over
/// dequantized bands): one row per type, every time a number.
#[test]
fn bench_matmul_types_times_every_backward() {
    let t = threads().to_string();
    let args = [
        "bench",
        "--matmul-types",
        "q4_1,q6_K,f16,f32",
        "--matmul-n",
        "256",
        "--tokens",
        "64",
        "--steps",
        "1",
        "-t",
        &t,
    ];
    let (ok, out, err) = run_cli(&args);
    assert!(ok, "{err}");
    for ty in ["q4_1", "q6_K", "f16", "f32"] {
        let row: Vec<&str> = out
            .lines()
            .map(str::split_whitespace)
            .map(Iterator::collect::<Vec<_>>)
            .find(|r| r.first() == Some(&ty))
            .unwrap_or_else(|| panic!("no {ty} row in {out}"));
        // type, forward, fwd GEMM, stock, transposed, GEMM, speed-up.
        assert_eq!(row.len(), 7, "{out}");
        for v in &row[1..6] {
            let x: f64 = v.parse().unwrap_or_else(|_| panic!("{v} in {out}"));
            assert!(x.is_finite() && x >= 0.0, "{out}");
        }
    }
}

/// With the default backward the CPU trains on the weights as stored: no
/// transposed copies and nothing moved to the repacking buffer, even for a
/// type the CPU repacks (Q4_0 on AVX2); without the GEMM every matrix gets
/// its F16 copy again.
#[test]
fn default_cpu_backward_keeps_no_copies() {
    let dir = tmpdir("gemm-copies");
    let path = synth(&dir, "llama", GgmlType::Q4_0);
    let t = threads().to_string();
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "--model",
            path.to_str().unwrap(),
            "--tokens",
            "40",
            "--steps",
            "1",
            "--json",
            "-t",
            &t,
        ];
        args.extend_from_slice(extra);
        let (ok, out, err) = run_cli(&args);
        assert!(ok, "{err}");
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        let n = |k: &str| j[k].as_u64().unwrap_or_else(|| panic!("{k} in {out}"));
        (n("transposed_bytes"), n("weights_repacked"))
    };
    assert_eq!(bench(&[]), (0, 0));
    let (bytes, _) = bench(&["--no-gemm"]);
    assert!(bytes > 0, "--no-gemm: F16 copies expected");
    let _ = std::fs::remove_dir_all(dir);
}

/// The SwiGLU gate's gradient (ggml's SILU_BACK, scalar `expf` per element)
/// vectorized on AVX2 CPUs: equal to the exact `u·σ(g)(1 + g(1 − σ(g)))`
/// to float rounding across [-100, 100] (both saturated ends included) and
/// to ggml's own kernel, rows with a scalar tail included.
#[test]
fn vectorized_silu_back_matches_exact_gradient() {
    let (n, rows) = (75usize, 6usize);
    let mut rng = Rng::new(9);
    let mut gv: Vec<f32> = (0..n * rows).map(|_| rng.normal() * 6.0).collect();
    gv[..8].copy_from_slice(&[-100.0, -90.0, -87.5, -20.0, 0.0, 20.0, 90.0, 100.0]);
    let uv: Vec<f32> = (0..n * rows).map(|_| rng.normal()).collect();
    let grad = |fast: bool| {
        let ctx = Context::new(64, 64, true);
        let g = ctx
            .new_tensor(GgmlType::F32, &[n as i64, rows as i64])
            .set_input()
            .set_param();
        let u = ctx.new_tensor(GgmlType::F32, &[n as i64, rows as i64]).set_input();
        let loss = ctx.sum(ctx.swiglu_split(g, u)).set_loss().set_output();
        let (gr, _sched, rewritten) = run_backward(&ctx, loss, fast, || {
            g.write_f32(&gv);
            u.write_f32(&uv);
        });
        assert_eq!(rewritten, fast as usize, "SILU_BACK rewritten");
        gr.grad(g).unwrap().read_f32()
    };
    let exact: Vec<f64> = gv
        .iter()
        .zip(&uv)
        .map(|(&g, &u)| {
            let (g, u) = (g as f64, u as f64);
            let s = 1.0 / (1.0 + (-g).exp());
            u * s * (1.0 + g * (1.0 - s))
        })
        .collect();
    let worst = |got: &[f32]| {
        got.iter()
            .zip(&exact)
            .map(|(x, e)| (*x as f64 - e).abs() / e.abs().max(1e-3))
            .fold(0f64, worse)
    };
    let (fast, stock) = (grad(true), grad(false));
    let (wf, ws) = (worst(&fast), worst(&stock));
    println!("SILU_BACK vs exact: vectorized {wf:.2e}, ggml {ws:.2e}");
    assert!(wf < 1e-5 && ws < 1e-5, "vectorized {wf:.2e}, ggml {ws:.2e}");
}

/// Element-wise chains fused into single passes: `rms_norm(x)·w` itself,
/// the gradient through it (ggml's MUL by the weight row, then its scalar
/// RMS_NORM_BACK) and through SwiGLU (`SILU_BACK(MUL(dy, u), g)` and
/// `MUL(SILU(g), dy)`) equal an f64 evaluation of the values and exact gradients to
/// float rounding, and ggml's own kernels, on rows with a scalar tail.
#[test]
fn fused_norm_and_swiglu_chains_match_f64() {
    let (n, rows, eps) = (75usize, 6usize, 1e-5f32);
    let mut rng = Rng::new(17);
    let mut normal = |k: usize, s: f32| (0..k).map(|_| rng.normal() * s).collect::<Vec<f32>>();
    let (xv, wv, dnv) = (normal(n * rows, 2.0), normal(n, 1.0), normal(n * rows, 1.0));
    let (gv, uv, dsv) = (normal(n * rows, 4.0), normal(n * rows, 1.0), normal(n * rows, 1.0));
    let run = |fast: bool| {
        let ctx = Context::new(64, 64, true);
        let shape = [n as i64, rows as i64];
        let param = || ctx.new_tensor(GgmlType::F32, &shape).set_input().set_param();
        let input = |ne: &[i64]| ctx.new_tensor(GgmlType::F32, ne).set_input();
        let (x, g, u) = (param(), param(), param());
        let (w, dn, ds) = (input(&[n as i64]), input(&shape), input(&shape));
        // Σ dn ⊙ (rms_norm(x)·w) + Σ ds ⊙ swiglu(g, u)
        let normed = ctx.mul(ctx.rms_norm(x, eps), w).set_output();
        let norm = ctx.mul(normed, dn);
        let glu = ctx.mul(ctx.swiglu_split(g, u), ds);
        let loss = ctx.add(ctx.sum(norm), ctx.sum(glu)).set_loss().set_output();
        let (gr, _sched, rewritten) = run_backward(&ctx, loss, fast, || {
            for (t, v) in [(x, &xv), (g, &gv), (u, &uv), (w, &wv), (dn, &dnv), (ds, &dsv)] {
                t.write_f32(v);
            }
        });
        assert_eq!(rewritten, 4 * fast as usize, "four fused nodes");
        let grads = [x, g, u].map(|t| gr.grad(t).unwrap().read_f32());
        (normed.read_f32(), grads)
    };
    // The norm and the exact gradients, in f64.
    let (mut normed, mut dx, mut dg, mut du) = (vec![], vec![], vec![], vec![]);
    for r in 0..rows {
        let at = |v: &[f32], i: usize| v[r * n + i] as f64;
        let ss: f64 = (0..n).map(|i| at(&xv, i).powi(2)).sum();
        let rms = (ss / n as f64 + eps as f64).sqrt();
        let dot: f64 = (0..n).map(|i| at(&xv, i) * wv[i] as f64 * at(&dnv, i)).sum();
        for (i, &w) in wv.iter().enumerate() {
            normed.push(at(&xv, i) / rms * w as f64);
            dx.push(w as f64 * at(&dnv, i) / rms - at(&xv, i) * dot / (n as f64 * rms.powi(3)));
            let (g, s) = (at(&gv, i), 1.0 / (1.0 + (-at(&gv, i)).exp()));
            dg.push(at(&dsv, i) * at(&uv, i) * s * (1.0 + g * (1.0 - s)));
            du.push(at(&dsv, i) * g * s);
        }
    }
    let exact = [dx, dg, du];
    let ((nf, fast), (ns, stock)) = (run(true), run(false));
    let (wf, ws) = (worst_relative(&nf, &normed), worst_relative(&ns, &normed));
    println!("rms_norm(x)·w: fused {wf:.1e}, ggml {ws:.1e} of the largest");
    assert!(wf < 1e-6 && ws < 1e-6, "norm: fused {wf:.1e}, ggml {ws:.1e}");
    for (i, what) in ["x (norm)", "g (gate)", "u (up)"].into_iter().enumerate() {
        let (wf, ws) = (
            worst_relative(&fast[i], &exact[i]),
            worst_relative(&stock[i], &exact[i]),
        );
        println!("gradient of {what}: fused {wf:.1e}, ggml {ws:.1e} of the largest");
        assert!(wf < 1e-6 && ws < 1e-6, "{what}: fused {wf:.1e}, ggml {ws:.1e}");
    }
}

/// Fusing keeps ggml's allocator freeing what is done with: a forward
/// graph of eight `x + rms_norm(x)·w` blocks needs no larger a compute
/// buffer with the norms fused than without (a fused node left as a view
/// that nothing reads held its source to the graph's end: +135 MiB on a
/// 1024-token forward of SmolLM2).
#[test]
fn fused_chains_keep_the_allocator_freeing() {
    let (n, rows) = (512i64, 64i64);
    let buffer = |fuse: bool| {
        let backend = Backend::cpu(threads());
        let ctx = Context::new(64, 64, false);
        let mut x = ctx.new_tensor(GgmlType::F32, &[n, rows]).set_input();
        let w = ctx.new_tensor(GgmlType::F32, &[n]).set_input();
        for _ in 0..8 {
            x = ctx.add(x, ctx.mul(ctx.rms_norm(x, 1e-5), w));
        }
        x.set_output();
        let mut g = ctx.new_graph(64, false);
        g.build_forward(x);
        let fused = if fuse { g.gemm_products() } else { 0 };
        let mut sched = Sched::new(std::slice::from_ref(&backend), 64);
        sched.alloc(&g).unwrap();
        (fused, sched.compute_buffer_bytes())
    };
    let ((fused, with), (_, without)) = (buffer(true), buffer(false));
    println!("compute buffer: {with} bytes fused ({fused} nodes), {without} not");
    assert_eq!(fused, 8, "every norm fused");
    assert!(with <= without, "fused {with} bytes, unfused {without}");
}

/// `rows` rows of `n` logits (normal × 4), the first row starting with
/// values far below and above the rest.
fn hard_logits(rng: &mut Rng, n: usize, rows: usize) -> Vec<f32> {
    let mut x: Vec<f32> = (0..n * rows).map(|_| rng.normal() * 4.0).collect();
    x[..4].copy_from_slice(&[-300.0, 40.0, -1e4, 0.0]);
    x
}

/// The mean cross-entropy of softmax over rows of `n` logits against
/// target weights `t(row, class)`, and its gradient `(softmax(x) − t) /
/// rows`, in f64.
fn f64_cross_entropy(x: &[f32], n: usize, t: impl Fn(usize, usize) -> f64) -> (f64, Vec<f64>) {
    let rows = (x.len() / n) as f64;
    let (mut loss, mut grad) = (0f64, Vec::with_capacity(x.len()));
    for (r, x) in x.chunks(n).enumerate() {
        let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
        for (i, &v) in x.iter().enumerate() {
            loss -= t(r, i) * (v as f64 - max - sum.ln()) / rows;
            grad.push(((v as f64 - max).exp() / sum - t(r, i)) / rows);
        }
    }
    (loss, grad)
}

/// The loss (ggml's CROSS_ENTROPY_LOSS, scalar `expf` per logit)
/// vectorized on AVX2 CPUs: equal to an f64 evaluation of
/// `−mean Σ t · log softmax(x)` and to ggml's kernel to float rounding,
/// with soft targets, a scalar tail, and logits far below the row's max; the
/// gradient (ggml's CROSS_ENTROPY_LOSS_BACK, not rewritten: its passes are
/// vectorized already, and a three-pass kernel of ours measured 0.015 →
/// 0.013 s a step, not worth its code) unchanged, and equal to an f64
/// evaluation to float rounding.
#[test]
fn vectorized_cross_entropy_matches_f64() {
    let (n, rows) = (1003usize, 5usize);
    let mut rng = Rng::new(11);
    let xv = hard_logits(&mut rng, n, rows);
    let mut tv: Vec<f32> = (0..n * rows).map(|_| rng.f32().powi(8)).collect();
    for r in tv.chunks_mut(n) {
        let s: f32 = r.iter().sum();
        r.iter_mut().for_each(|t| *t /= s);
    }
    let run = |fast: bool| {
        let ctx = Context::new(64, 64, true);
        let x = ctx
            .new_tensor(GgmlType::F32, &[n as i64, rows as i64])
            .set_input()
            .set_param();
        let t = ctx.new_tensor(GgmlType::F32, &[n as i64, rows as i64]).set_input();
        let loss = ctx.cross_entropy_loss(x, t).set_loss().set_output();
        let (gr, _sched, rewritten) = run_backward(&ctx, loss, fast, || {
            x.write_f32(&xv);
            t.write_f32(&tv);
        });
        assert_eq!(rewritten, fast as usize, "CROSS_ENTROPY_LOSS rewritten");
        (loss.read_f32()[0], gr.grad(x).unwrap().read_f32())
    };
    let (exact, exact_grad) = f64_cross_entropy(&xv, n, |r, i| tv[r * n + i] as f64);
    let ((fast, gf), (stock, gs)) = (run(true), run(false));
    let rel = |v: f32| (v as f64 - exact).abs() / exact.abs();
    println!(
        "loss {exact}: vectorized {fast} ({:.1e}), ggml {stock} ({:.1e})",
        rel(fast),
        rel(stock)
    );
    assert!(
        rel(fast) < 1e-6 && rel(stock) < 1e-5,
        "vectorized {fast}, ggml {stock}, f64 {exact}"
    );
    let worst = |g: &[f32]| {
        g.iter()
            .zip(&exact_grad)
            .fold(0f64, |m, (&g, &e)| worse(m, (g as f64 - e).abs()))
    };
    let top = exact_grad.iter().fold(0f64, |m, e| m.max(e.abs()));
    println!("gradient (values up to {top:.1e}): {:.1e} off", worst(&gs));
    assert_eq!(gf, gs, "the gradient is ggml's either way");
    assert!(worst(&gs) < 1e-6 * top, "{:.1e} off", worst(&gs));
}

/// Attention's softmax (ggml's SOFT_MAX with a scale and a mask broadcast
/// over heads: five passes per row, the mask added in a scalar loop)
/// vectorized on AVX2 CPUs: equal to an f64 softmax of `x · scale + mask`
/// to float rounding, masked (−∞) positions exactly 0, with F16 and F32
/// causal masks and rows with a scalar tail; the input gradient through it
/// matches ggml's to float rounding.
#[test]
fn vectorized_soft_max_matches_f64() {
    let (n, rows, heads) = (75usize, 75usize, 3usize);
    let scale = 0.125f32;
    let mut rng = Rng::new(13);
    let xv: Vec<f32> = (0..n * rows * heads).map(|_| rng.normal() * 8.0).collect();
    // Causal, and two sequences packed in one (keys before 40 hidden from
    // the second's queries too): rows end in hidden keys, and the packed
    // ones also start with some.
    let hide = |packed: bool| {
        (0..rows * n)
            .map(move |k| {
                let (key, query) = (k % n, k / n);
                let other_sequence = packed && query >= 40 && key < 40;
                if key > query || other_sequence {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect::<Vec<f32>>()
    };
    let dyv: Vec<f32> = (0..n * rows * heads).map(|_| rng.normal()).collect();
    let run = |fast: bool, mask_ty: GgmlType, maskv: &[f32]| {
        let ctx = Context::new(64, 64, true);
        let x = ctx
            .new_tensor(GgmlType::F32, &[n as i64, rows as i64, heads as i64])
            .set_input()
            .set_param();
        let mask = ctx.new_tensor(mask_ty, &[n as i64, rows as i64]).set_input();
        let dy = ctx
            .new_tensor(GgmlType::F32, &[n as i64, rows as i64, heads as i64])
            .set_input();
        let y = ctx.soft_max_ext(x, Some(mask), scale).set_output();
        let loss = ctx.sum(ctx.mul(y, dy)).set_loss().set_output();
        let (gr, _sched, rewritten) = run_backward(&ctx, loss, fast, || {
            x.write_f32(&xv);
            mask.write_bytes(&mask_ty.from_f32(maskv, n));
            dy.write_f32(&dyv);
        });
        assert_eq!(rewritten, fast as usize, "SOFT_MAX rewritten");
        (y.read_f32(), gr.grad(x).unwrap().read_f32())
    };
    for (packed, mask_ty) in [(false, GgmlType::F16), (false, GgmlType::F32), (true, GgmlType::F16)] {
        let maskv = hide(packed);
        let mut exact = vec![0f64; xv.len()];
        for (r, (xr, er)) in xv.chunks(n).zip(exact.chunks_mut(n)).enumerate() {
            let mr = &maskv[(r % rows) * n..][..n];
            let w: Vec<f64> = xr
                .iter()
                .zip(mr)
                .map(|(&x, &m)| x as f64 * scale as f64 + m as f64)
                .collect();
            let max = w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = w.iter().map(|v| (v - max).exp()).sum();
            for (e, v) in er.iter_mut().zip(&w) {
                *e = (v - max).exp() / sum;
            }
        }
        let ((yf, gf), (ys, gs)) = (run(true, mask_ty, &maskv), run(false, mask_ty, &maskv));
        let worst = |y: &[f32]| {
            y.iter()
                .zip(&exact)
                .map(|(&v, &e)| (v as f64 - e).abs() / e.max(1e-30))
                .fold(0f64, worse)
        };
        let zeros = yf.iter().zip(&exact).all(|(&v, &e)| (e == 0.0) == (v == 0.0));
        let gdiff = gf
            .iter()
            .zip(&gs)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
            .fold(0f32, worse32);
        println!(
            "softmax, {} {} mask: vectorized {:.1e}, ggml {:.1e} from f64; input gradient {gdiff:.1e} from ggml's",
            if packed { "packed" } else { "causal" },
            mask_ty.name(),
            worst(&yf),
            worst(&ys)
        );
        assert!(zeros, "masked positions exactly 0, the others not");
        assert!(worst(&yf) < 1e-5 && worst(&ys) < 1e-5);
        assert!(gdiff < 1e-4, "gradient {gdiff:e} off ggml's");
    }
}

/// `0.37 · product(inputs)` over F32 inputs of the given shapes and values,
/// after the GEMM's rewrites; where `fold` is false the product is an
/// output too, so its SCALE cannot fold. Returns how many nodes the
/// rewrites made and the scaled values.
fn scaled_product(
    fold: bool,
    inputs: &[([i64; 2], &[f32])],
    product: for<'a> fn(&'a Context, &[Tensor<'a>]) -> Tensor<'a>,
) -> (usize, Vec<f32>) {
    let backend = Backend::cpu(threads());
    let ctx = Context::new(16, 16, false);
    let xs: Vec<_> = inputs
        .iter()
        .map(|(ne, _)| ctx.new_tensor(GgmlType::F32, ne).set_input())
        .collect();
    let p = product(&ctx, &xs);
    if !fold {
        p.set_output();
    }
    let y = ctx.scale(p, 0.37).set_output();
    let mut gr = ctx.new_graph(16, false);
    gr.build_forward(y);
    let rewritten = gr.gemm_products();
    let mut sched = Sched::new(std::slice::from_ref(&backend), 16);
    sched.alloc(&gr).unwrap();
    for (x, (_, v)) in xs.iter().zip(inputs) {
        x.write_f32(v);
    }
    sched.compute(&gr).unwrap();
    (rewritten, y.read_f32())
}

/// LoRA's scale, `s · B·(A·x)`, folded into the GEMM that computes `B·(A·x)`
/// (one node and one pass fewer): the same bits as the separate SCALE node,
/// which stays where the product's result has another use.
#[test]
fn lora_scale_folds_into_the_gemm() {
    let mut rng = Rng::new(17);
    let mut vals = |n: usize| (0..n).map(|_| rng.normal()).collect::<Vec<f32>>();
    let (av, bv, xv) = (vals(48 * 8), vals(8 * 40), vals(48 * 36));
    let inputs = [([48, 8], &av[..]), ([8, 40], &bv[..]), ([48, 36], &xv[..])];
    let bax: for<'a> fn(&'a Context, &[Tensor<'a>]) -> Tensor<'a> = |c, x| c.mul_mat(x[1], c.mul_mat(x[0], x[2]));
    let ((n_fold, y_fold), (n_kept, y_kept)) =
        (scaled_product(true, &inputs, bax), scaled_product(false, &inputs, bax));
    assert_eq!(
        (n_fold, n_kept),
        (3, 2),
        "both products on the GEMM, the SCALE folded once"
    );
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&y_fold), bits(&y_kept));

    // A scale folded into a product with long sums and room for the
    // register-tiled GEMM (each of up to four threads' columns fill its
    // tiles): the same bits too, its sums taken in one pass.
    let (wv, xv) = (vals(200 * 40), vals(200 * 100));
    let inputs = [([200, 40], &wv[..]), ([200, 100], &xv[..])];
    let wx: for<'a> fn(&'a Context, &[Tensor<'a>]) -> Tensor<'a> = |c, x| c.mul_mat(x[0], x[1]);
    let ((n_fold, y_fold), (n_kept, y_kept)) = (scaled_product(true, &inputs, wx), scaled_product(false, &inputs, wx));
    assert_eq!((n_fold, n_kept), (2, 1), "the SCALE folded into the long product");
    assert_eq!(bits(&y_fold), bits(&y_kept));
}

/// A sum of a product and a LoRA-short one — `W·x + s·B·(A·x)` forward,
/// `Wᵀ·dy + A·d` in an input gradient — computed as one node from the short
/// product's operands: the same bits as the separate nodes, which stay
/// where a product's result has another use. Where the first product is a
/// GEMM node (an F32 W, or a quantized one dequantized in bands), that node
/// adds the short product itself and the sum is a view of it.
#[test]
fn sums_with_a_short_product_fold_into_one_node() {
    let mut rng = Rng::new(19);
    let mut vals = |n: usize| (0..n).map(|_| rng.normal()).collect::<Vec<f32>>();
    let (wv, av, bv, xv, dv) = (vals(64 * 45), vals(64 * 8), vals(8 * 45), vals(64 * 36), vals(8 * 36));
    let dyv: Vec<f32> = xv.iter().take(45 * 36).map(|v| v * 0.5).collect();
    let run = |fold: bool, forward: bool, wty: GgmlType, short_first: bool| {
        let backend = Backend::cpu(threads());
        let ctx = Context::new(16, 16, false);
        let w = ctx.new_tensor(wty, &[64, 45]).set_input();
        let a = ctx.new_tensor(GgmlType::F32, &[64, 8]).set_input();
        let b = ctx.new_tensor(GgmlType::F32, &[8, 45]).set_input();
        let x = ctx.new_tensor(GgmlType::F32, &[64, 36]).set_input();
        let d = ctx.new_tensor(GgmlType::F32, &[8, 36]).set_input();
        let dy = ctx.new_tensor(GgmlType::F32, &[45, 36]).set_input();
        let (first, short) = if forward {
            (ctx.mul_mat(w, x), ctx.scale(ctx.mul_mat(b, ctx.mul_mat(a, x)), 0.37))
        } else {
            (ctx.out_prod(w, ctx.transpose(dy)), ctx.out_prod(a, ctx.transpose(d)))
        };
        // The graph runs an ADD's operands in their order.
        let sum = if short_first {
            ctx.add(short, first)
        } else {
            ctx.add(first, short)
        };
        if !fold {
            first.set_output();
        }
        // The sum read by a later node (a graph's outputs are never folded).
        let y = ctx.scale(sum, 2.0).set_output();
        let mut gr = ctx.new_graph(16, false);
        gr.build_forward(y);
        let rewritten = gr.gemm_products();
        let mut sched = Sched::new(std::slice::from_ref(&backend), 16);
        sched.alloc(&gr).unwrap();
        // Inputs the graph does not use are not allocated.
        for (t, v) in [(w, &wv), (a, &av), (b, &bv), (x, &xv), (d, &dv), (dy, &dyv)] {
            if !t.is_allocated() {
                continue;
            }
            match t.ty() {
                GgmlType::F32 => t.write_f32(v),
                ty => t.write_bytes(&ty.from_f32(v, 64)),
            }
        }
        sched.compute(&gr).unwrap();
        (rewritten, sum.op_desc(), y.read_f32())
    };
    for (wty, forward, short_first) in [GgmlType::F32, GgmlType::Q4_1]
        .into_iter()
        .flat_map(|t| [(t, true, false), (t, false, false), (t, true, true), (t, false, true)])
    {
        let nodes = if forward { 5 } else { 3 };
        let case = format!("{wty:?} forward {forward}, short product first {short_first}");
        let ((n_fold, op, y_fold), (n_kept, kept_op, y_kept)) = (
            run(true, forward, wty, short_first),
            run(false, forward, wty, short_first),
        );
        assert_eq!((n_fold, n_kept), (nodes, nodes - 1), "{case}: the ADD folded once");
        assert_eq!(
            (op.as_str(), kept_op.as_str()),
            ("VIEW", "ADD"),
            "{case}: the first product computes the sum"
        );
        let diff = y_fold
            .iter()
            .zip(&y_kept)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(y_fold.len(), y_kept.len(), "{case}");
        assert_eq!(diff, 0, "{case}: values differ");
    }
}

/// A frozen weight's product added to a tensor computed before it — a
/// residual sum `d + W·x (+ LoRA)` in the forward, a sum of input gradients
/// `d + Wᵀ·dy` in the backward — folds into the product, which adds `d` to
/// each tile once it is final: the ADD becomes a view, with the ADD's
/// values bit for bit, over sums in two passes and tiles at the edges.
/// Where `d` is computed after the product (an ADD of them in the other
/// order), the ADD stays.
#[test]
fn sums_with_a_frozen_product_fold_into_it() {
    let mut rng = Rng::new(37);
    let mut vals = |n: i64| (0..n).map(|_| rng.normal()).collect::<Vec<f32>>();
    // Forward: W [416, 45] (two passes of the sum), x 36 tokens; backward:
    // W [64, 416] (its rows the sum's terms), dy 36 tokens.
    let (wf, xf, db) = (vals(416 * 45), vals(416 * 36), vals(64 * 36));
    let (wb, dyb, df) = (vals(64 * 416), vals(416 * 36), vals(45 * 36));
    let (av, bv) = (vals(416 * 8), vals(8 * 45));
    let run = |fold: bool, forward: bool, lora: bool, d_first: bool| {
        let backend = Backend::cpu(threads());
        let ctx = Context::new(32, 32, false);
        let input = |ty: GgmlType, ne: [i64; 2], v: &[f32]| (ctx.new_tensor(ty, &ne).set_input(), ty, v.to_vec());
        let (w, x, d) = if forward {
            (
                input(GgmlType::Q4_1, [416, 45], &wf),
                input(GgmlType::F32, [416, 36], &xf),
                input(GgmlType::F32, [45, 36], &df),
            )
        } else {
            (
                input(GgmlType::Q4_1, [64, 416], &wb),
                input(GgmlType::F32, [416, 36], &dyb),
                input(GgmlType::F32, [64, 36], &db),
            )
        };
        let (a, b) = (input(GgmlType::F32, [416, 8], &av), input(GgmlType::F32, [8, 45], &bv));
        let mut product = if forward {
            ctx.mul_mat(w.0, x.0)
        } else {
            ctx.out_prod(w.0, ctx.transpose(x.0))
        };
        if lora && forward {
            product = ctx.add(product, ctx.scale(ctx.mul_mat(b.0, ctx.mul_mat(a.0, x.0)), 0.37));
        }
        // d: a node of the graph, before the product where it comes first.
        let d_node = ctx.scale(d.0, 1.5);
        let sum = if d_first {
            ctx.add(d_node, product)
        } else {
            ctx.add(product, d_node)
        };
        if !fold {
            product.set_output();
        }
        let y = ctx.scale(sum, 2.0).set_output();
        let mut gr = ctx.new_graph(32, false);
        gr.build_forward(y);
        gr.gemm_products();
        let mut sched = Sched::new(std::slice::from_ref(&backend), 32);
        sched.alloc(&gr).unwrap();
        for (t, ty, v) in [w, x, d, a, b] {
            if !t.is_allocated() {
                continue;
            }
            match ty {
                GgmlType::F32 => t.write_f32(&v),
                ty => t.write_bytes(&ty.from_f32(&v, t.ne()[0] as usize)),
            }
        }
        sched.compute(&gr).unwrap();
        (sum.op_desc(), y.read_f32())
    };
    for (forward, lora, d_first) in [
        (true, false, true),
        (true, true, true),
        (false, false, true),
        (true, true, false),
        (false, false, false),
    ] {
        let case = format!("forward {forward}, LoRA {lora}, d first {d_first}");
        let ((op, y_fold), (kept_op, y_kept)) = (run(true, forward, lora, d_first), run(false, forward, lora, d_first));
        let want = if d_first { "VIEW" } else { "ADD" };
        assert_eq!(
            (op.as_str(), kept_op.as_str()),
            (want, "ADD"),
            "{case}: the ADD folded where d runs first"
        );
        assert_eq!(y_fold.len(), y_kept.len(), "{case}");
        let diff = y_fold
            .iter()
            .zip(&y_kept)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(diff, 0, "{case}: values differ");
    }
}

/// Input gradients that sum several adapters' short products — a chain
/// `(Wᵀ·dy + A₁·d₁) + A₂·d₂` as ggml accumulates them, a nested
/// `Wᵀ·dy + (A₁·d₁ + A₂·d₂)`, over many tokens and over few (the GEMM then
/// splits the result by rows) — give ggml's own values, with every ADD of
/// the chain folded.
#[test]
fn sums_of_several_short_products_match_ggml() {
    let mut rng = Rng::new(29);
    for (wty, tokens, nested) in [
        (GgmlType::F32, 36, false),
        (GgmlType::Q4_1, 36, false),
        (GgmlType::F32, 36, true),
        (GgmlType::Q4_1, 36, true),
        (GgmlType::F32, 6, false),
        (GgmlType::Q4_1, 6, true),
    ] {
        let mut vals = |n: i64| (0..n).map(|_| rng.normal()).collect::<Vec<f32>>();
        let (wv, a1v, a2v, d1v, d2v, dyv) = (
            vals(64 * 45),
            vals(64 * 8),
            vals(64 * 8),
            vals(8 * tokens),
            vals(8 * tokens),
            vals(45 * tokens),
        );
        let run = |gemm: bool| {
            let backend = Backend::cpu(threads());
            let ctx = Context::new(32, 32, false);
            let w = ctx.new_tensor(wty, &[64, 45]).set_input();
            let a1 = ctx.new_tensor(GgmlType::F32, &[64, 8]).set_input();
            let a2 = ctx.new_tensor(GgmlType::F32, &[64, 8]).set_input();
            let d1 = ctx.new_tensor(GgmlType::F32, &[8, tokens]).set_input();
            let d2 = ctx.new_tensor(GgmlType::F32, &[8, tokens]).set_input();
            let dy = ctx.new_tensor(GgmlType::F32, &[45, tokens]).set_input();
            let big = ctx.out_prod(w, ctx.transpose(dy));
            let (s1, s2) = (ctx.out_prod(a1, ctx.transpose(d1)), ctx.out_prod(a2, ctx.transpose(d2)));
            let sum = if nested {
                ctx.add(big, ctx.add(s1, s2))
            } else {
                ctx.add(ctx.add(big, s1), s2)
            };
            let y = ctx.scale(sum, 2.0).set_output();
            let mut gr = ctx.new_graph(32, false);
            gr.build_forward(y);
            if gemm {
                gr.gemm_products();
            }
            let mut sched = Sched::new(std::slice::from_ref(&backend), 32);
            sched.alloc(&gr).unwrap();
            for (t, v) in [(a1, &a1v), (a2, &a2v), (d1, &d1v), (d2, &d2v), (dy, &dyv)] {
                t.write_f32(v);
            }
            match wty {
                GgmlType::F32 => w.write_f32(&wv),
                ty => w.write_bytes(&ty.from_f32(&wv, 64)),
            }
            sched.compute(&gr).unwrap();
            (y.read_f32(), sum.op_desc())
        };
        let ((got, op), (want, _)) = (run(true), run(false));
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(&want).fold(0f32, |m, (a, b)| worse32(m, (a - b).abs()));
        let case = format!("{wty:?}, {tokens} tokens, nested {nested}");
        println!("{case}: largest difference {worst:.2e} (values up to {scale:.2e}), the sum a {op}");
        assert!(
            worst <= 1e-5 * scale,
            "{case}: {worst:.2e} off ggml's (values up to {scale:.2e})"
        );
        if !nested {
            assert_eq!(op, "CUSTOM", "{case}: the outer ADD folded too");
        }
    }
}

/// Attention under a causal mask with prefix keys and grouped queries (3
/// query heads over one KV head, and 4 over each of two; 150 queries:
/// blocks and thread shares that end inside a query group): the six
/// products around the softmax — scores, `P·V`, and the gradients of P, V,
/// K and Q — skip what the mask hides, the forward's softmax runs inside the
/// scores' product and its backward inside P's gradient, and the output and
/// every gradient match the same graph whose mask is not declared causal
/// (where ggml's kernels run both). Rematerialized (P recomputed from the
/// scores in the backward, by a softmax of its own), the recomputed scores
/// skip the same entries and every value is bit for bit the graph's without
/// it.
#[test]
fn causal_attention_products_skip_what_the_mask_hides() {
    // One KV head under three query heads, and two under four each; then
    // heads of 64 (a real model's), whose products fill the register-tiled
    // GEMM's tiles, sums over two query heads added pass by pass. (Each
    // case's probabilities are over the 256 KiB below which they are not
    // recomputed.)
    for heads in [(3i64, 1i64, 8i64), (8, 2, 8), (4, 2, 64)] {
        let nkv = heads.1;
        let run = |causal: bool, remat: bool| attention_step(heads, 23, 0.35, (causal, remat, false));
        let ((n_causal, _, o_causal, g_causal, p_causal), (n_plain, _, o_plain, g_plain, p_plain)) =
            (run(true, false), run(false, false));
        assert_eq!(
            n_causal - n_plain,
            8,
            "six attention products marked, the softmax fused into the scores' product, its backward into P's gradient"
        );
        assert_eq!((p_causal.as_str(), p_plain.as_str()), ("VIEW", "CUSTOM"));
        let (n_remat, recomputed, o_remat, g_remat, _) = run(true, true);
        assert_eq!(recomputed, 1, "the probabilities recomputed");
        // The scores' product and softmax once more, the product marked and
        // the softmax fused into it, as the forward's: the same values, bit
        // for bit.
        assert_eq!(
            n_remat - n_causal,
            4,
            "the recomputed scores skip hidden entries and compute their softmax"
        );
        let differ = |p: &[f32], q: &[f32]| p.iter().zip(q).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differ(&o_remat, &o_causal), 0, "output");
        for (what, (p, q)) in ["dQ", "dK", "dV"].iter().zip(g_remat.iter().zip(&g_causal)) {
            assert_eq!(differ(p, q), 0, "{what}: rematerialized values differ");
        }
        for (what, (worst, scale)) in attention_differences((&o_causal, &g_causal), (&o_plain, &g_plain)) {
            println!("{nkv} KV heads, {what}: largest difference {worst:.2e} (values up to {scale:.2e})");
            // Summation-order rounding only: the 8-wide heads' unmasked
            // products run on other kernels (try_narrow) than the causal
            // ones, over sums of up to 450 terms.
            assert!(
                scale > 0.0 && worst <= 4e-6 * scale,
                "{what}: {worst:.2e} off (values up to {scale:.2e})"
            );
        }
    }
}

/// Query heads, KV heads, head size.
type Heads = (i64, i64, i64);

/// What [`attention_step`] gives: the GEMM nodes rewritten, the values
/// recomputed, the output, the gradients of Q, K and V, and the
/// probabilities' op.
type AttentionStep = (usize, usize, Vec<f32>, [Vec<f32>; 3], String);

/// A training step through one attention: 150 queries after 5 prefix keys
/// (query i sees the prefix and the keys up to its own), grouped-query
/// heads, random Q, K, V and R from `seed`, softmax scale `scale`, under
/// the loss `Σ o ⊙ r`, with the GEMM; the mask declared causal where
/// `causal`, values rematerialized where `remat`, and the graph reading a
/// leaf marked for bf16 products where `bf16`.
fn attention_step(heads: Heads, seed: u64, scale: f32, flags: (bool, bool, bool)) -> AttentionStep {
    attention_step_on(threads(), heads, seed, scale, flags)
}

/// [`attention_step`] on `n_threads` threads.
fn attention_step_on(
    n_threads: usize,
    (nh, nkv, hd): Heads,
    seed: u64,
    scale: f32,
    (causal, remat, bf16): (bool, bool, bool),
) -> AttentionStep {
    let (n, np) = (150i64, 5i64);
    let keys = n + np;
    let mut rng = Rng::new(seed);
    let mut vals = |len: i64| (0..len).map(|_| rng.normal()).collect::<Vec<f32>>();
    let (qv, kv, vv, rv) = (
        vals(hd * n * nh),
        vals(hd * keys * nkv),
        vals(hd * keys * nkv),
        vals(hd * n * nh),
    );
    let mut mv = vec![f32::NEG_INFINITY; (keys * n) as usize];
    for i in 0..n {
        mv[(i * keys) as usize..(i * keys + np + i + 1) as usize].fill(0.0);
    }
    let ctx = Context::new(64, 64, true);
    let q = ctx.new_tensor(GgmlType::F32, &[hd, n, nh]).set_input().set_param();
    let k = ctx.new_tensor(GgmlType::F32, &[hd, keys, nkv]).set_input().set_param();
    let vt = ctx.new_tensor(GgmlType::F32, &[keys, hd, nkv]).set_input().set_param();
    let r = ctx.new_tensor(GgmlType::F32, &[hd, n, nh]).set_input();
    let m = ctx.new_tensor(GgmlType::F32, &[keys, n]).set_input();
    let m = if causal { m.set_causal_offset(np as usize) } else { m };
    let rows = |t: Tensor<'_>| t.ne()[0];
    let grouped = |t| ctx.reshape(t, &[rows(t), n * (nh / nkv), nkv]);
    let s = ctx.reshape(ctx.mul_mat(k, grouped(q)), &[keys, n, nh]);
    let p = ctx.soft_max_ext(s, Some(m), scale);
    let o = ctx.reshape(ctx.mul_mat(vt, grouped(p)), &[hd, n, nh]).set_output();
    let mut loss = ctx.sum(ctx.mul(o, r));
    // A weight of the graph marked for bf16 products (its own product is
    // beside the point).
    let w = bf16.then(|| ctx.new_tensor(GgmlType::F32, &[1]).set_input().set_bf16_products());
    if let Some(w) = w {
        loss = ctx.add(loss, ctx.sum(w));
    }
    let loss = loss.set_loss().set_output();
    let (gr, _sched, rewritten, recomputed) = run_backward_remat_on(n_threads, &ctx, loss, (true, remat), || {
        for (t, v) in [(q, &qv), (k, &kv), (vt, &vv), (r, &rv), (m, &mv)] {
            t.write_f32(v);
        }
        if let Some(w) = w {
            w.write_f32(&[0.0]);
        }
    });
    let grads = [q, k, vt].map(|t| gr.grad(t).unwrap().read_f32());
    (rewritten, recomputed, o.read_f32(), grads, p.op_desc())
}

/// For an attention's output and dQ, dK, dV (`got` against `want`): the
/// largest difference and the largest magnitude of `want`'s values.
fn attention_differences(
    (o, g): (&[f32], &[Vec<f32>; 3]),
    (o_want, g_want): (&[f32], &[Vec<f32>; 3]),
) -> [(&'static str, (f32, f32)); 4] {
    let diff = |got: &[f32], want: &[f32]| {
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let worst = got.iter().zip(want).fold(0f32, |a, (x, y)| worse32(a, (x - y).abs()));
        (worst, scale)
    };
    [
        ("output", diff(o, o_want)),
        ("dQ", diff(&g[0], &g_want[0])),
        ("dK", diff(&g[1], &g_want[1])),
        ("dV", diff(&g[2], &g_want[2])),
    ]
}

/// In a training graph whose frozen weights run their products in bf16,
/// attention's causal products round their operands to bf16 too (as
/// torch's bf16 autocast does): the output and the gradients of the
/// queries, keys and values stay within bf16 rounding of the F32 run's, and
/// differ from them by far more than F32 summation order would.
#[test]
fn attention_in_a_bf16_graph_runs_in_bf16() {
    if !gguf_peft::ggml::bf16_products_supported() {
        eprintln!("skipped: this CPU has no AVX512-BF16 (attention stays F32, tested elsewhere)");
        return;
    }
    let run = |bf16: bool| attention_step((4, 2, 64), 41, 0.125, (true, false, bf16));
    let ((_, _, o_bf, g_bf, _), (_, _, o_f32, g_f32, _)) = (run(true), run(false));
    for (what, (worst, scale)) in attention_differences((&o_bf, &g_bf), (&o_f32, &g_f32)) {
        let worst = worst / scale;
        println!("{what}: bf16 against F32 {worst:.2e} of the largest value");
        assert!(worst > 1e-4 && worst < 2e-2, "{what}: {worst:.2e}");
    }
}

/// Attention's output and gradients are the same, bit for bit, on 1 to 4
/// threads, in F32 and in bf16, with the probabilities held or recomputed:
/// each causal product's pieces follow a fixed grid of blocks, so every
/// value is summed alike wherever the threads' shares end. (Pieces that
/// started at a share's end summed their bf16 pairs from another first
/// term, and a bf16 step's loss changed with the thread count.)
#[test]
fn attention_is_the_same_on_any_thread_count() {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    for bf16 in [false, true] {
        if bf16 && !gguf_peft::ggml::bf16_products_supported() {
            eprintln!("bf16 skipped: this CPU has no AVX512-BF16");
            continue;
        }
        for remat in [false, true] {
            let run = |t| attention_step_on(t, (4, 2, 64), 41, 0.125, (true, remat, bf16));
            let (_, _, o1, g1, _) = run(1);
            for t in 2..=4 {
                let (_, _, o, g, _) = run(t);
                for (what, got, want) in [
                    ("output", &o, &o1),
                    ("dQ", &g[0], &g1[0]),
                    ("dK", &g[1], &g1[1]),
                    ("dV", &g[2], &g1[2]),
                ] {
                    assert!(
                        bits(got) == bits(want),
                        "bf16 {bf16}, recomputed {remat}: {what} on {t} threads differs from 1's"
                    );
                }
            }
        }
    }
}

/// LoRA's backward scales the output gradient (`dz = s·dy`) before the
/// products for B's gradient and the rank-r intermediate's; the GEMM folds
/// that scale into both products. The gradients of A, B and the input match
/// an f64 evaluation of `y = W·x + s·B·(A·x)` under `Σ y ⊙ R`.
#[test]
fn lora_gradient_scale_folds_into_its_products() {
    let (d_in, d_out, r, n, s) = (48usize, 45usize, 8usize, 36usize, 0.37f32);
    let mut rng = Rng::new(29);
    let mut vals = |len: usize| (0..len).map(|_| rng.normal()).collect::<Vec<f32>>();
    let (wv, av, bv, xv, rv) = (
        vals(d_in * d_out),
        vals(d_in * r),
        vals(r * d_out),
        vals(d_in * n),
        vals(d_out * n),
    );
    let ctx = Context::new(64, 64, true);
    let t = |ne: [usize; 2]| ctx.new_tensor(GgmlType::F32, &[ne[0] as i64, ne[1] as i64]).set_input();
    let (w, a, b, x, rr) = (
        t([d_in, d_out]),
        t([d_in, r]),
        t([r, d_out]),
        t([d_in, n]),
        t([d_out, n]),
    );
    let (a, b, x) = (a.set_param(), b.set_param(), x.set_param());
    let y = ctx.add(ctx.mul_mat(w, x), ctx.scale(ctx.mul_mat(b, ctx.mul_mat(a, x)), s));
    let loss = ctx.sum(ctx.mul(y, rr)).set_loss().set_output();
    let (gr, _sched, _) = run_backward(&ctx, loss, true, || {
        for (t, v) in [(w, &wv), (a, &av), (b, &bv), (x, &xv), (rr, &rv)] {
            t.write_f32(v);
        }
    });
    // f64: h = A·x [r, n], dh = s·Bᵀ·R, dB = s·h·Rᵀ, dA = x·dhᵀ, dx = W·R + A·dh
    // (ggml layouts: W[i + d_in·o], A[i + d_in·k], B[k + r·o], x[i + d_in·t]).
    let f = |v: &[f32], i: usize| v[i] as f64;
    let (sd, mut h, mut dh) = (s as f64, vec![0f64; r * n], vec![0f64; r * n]);
    for (k, tt) in (0..r).flat_map(|k| (0..n).map(move |tt| (k, tt))) {
        h[k + r * tt] = (0..d_in).map(|i| f(&av, i + d_in * k) * f(&xv, i + d_in * tt)).sum();
        dh[k + r * tt] = sd
            * (0..d_out)
                .map(|o| f(&bv, k + r * o) * f(&rv, o + d_out * tt))
                .sum::<f64>();
    }
    let db: Vec<f64> = (0..r * d_out)
        .map(|e| {
            sd * (0..n)
                .map(|tt| h[e % r + r * tt] * f(&rv, e / r + d_out * tt))
                .sum::<f64>()
        })
        .collect();
    let da: Vec<f64> = (0..d_in * r)
        .map(|e| {
            (0..n)
                .map(|tt| f(&xv, e % d_in + d_in * tt) * dh[e / d_in + r * tt])
                .sum()
        })
        .collect();
    let dx: Vec<f64> = (0..d_in * n)
        .map(|e| {
            let (i, tt) = (e % d_in, e / d_in);
            let wr: f64 = (0..d_out).map(|o| f(&wv, i + d_in * o) * f(&rv, o + d_out * tt)).sum();
            wr + (0..r).map(|k| f(&av, i + d_in * k) * dh[k + r * tt]).sum::<f64>()
        })
        .collect();
    for (what, p, want) in [("dA", a, &da), ("dB", b, &db), ("dx", x, &dx)] {
        let got = gr.grad(p).unwrap().read_f32();
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = got
            .iter()
            .zip(want)
            .fold(0f64, |m, (g, w)| worse(m, (*g as f64 - w).abs()));
        println!("{what}: largest difference {worst:.2e} (values up to {scale:.2e})");
        assert!(
            worst <= 1e-5 * scale,
            "{what}: {worst:.2e} off (values up to {scale:.2e})"
        );
    }
}

/// The training loss against one class per row (`cross_entropy_loss_targets`):
/// on the CPU the rewrite keeps the class ids (I32, one per row) instead of
/// one-hot rows, and the gradient takes the logits' memory; where the loss
/// and its backward alone read the logits, the loss leaves its softmax
/// there for the backward. The loss and its gradient equal an f64
/// evaluation to float rounding, and ggml's dense one-hot path (the graph
/// without the rewrite) on the same targets, either way.
#[test]
fn class_id_targets_match_one_hot_rows() {
    let (n, rows) = (1003usize, 5usize);
    let xv = hard_logits(&mut Rng::new(31), n, rows);
    // The last class (in a row's scalar tail) and the max logit among them.
    let ids: Vec<i32> = vec![1, 17, n as i32 - 1, 500, 0];
    let run = |compact: bool, scaled: bool| {
        let ctx = Context::new(64, 64, true);
        let x = ctx
            .new_tensor(GgmlType::F32, &[n as i64, rows as i64])
            .set_input()
            .set_param();
        let ones = (!scaled).then(|| ctx.new_tensor(GgmlType::F32, &[n as i64, rows as i64]).set_input());
        // Logits computed from the parameter (so the gradient may take
        // their memory), as a model's are; a SCALE may yet become a view
        // of its source, so its memory keeps the logits.
        let logits = ones.map_or_else(|| ctx.scale(x, 1.0), |ones| ctx.mul(x, ones));
        let (loss, t) = ctx.cross_entropy_loss_targets(logits);
        let loss = loss.set_loss().set_output();
        let (gr, _sched, rewritten) = run_backward(&ctx, loss, compact, || {
            x.write_f32(&xv);
            if let Some(ones) = ones {
                ones.write_f32(&vec![1.0; n * rows]);
            }
            t.write_targets(&ids);
        });
        if compact {
            assert_eq!(rewritten, 2, "the loss and its backward read ids");
            assert_eq!((t.ty(), t.ne()), (GgmlType::I32, [rows as i64, 1, 1, 1]));
        }
        (loss.read_f32()[0] as f64, gr.grad(x).unwrap().read_f32())
    };
    let (loss, grad) = f64_cross_entropy(&xv, n, |r, i| f64::from(u8::from(i == ids[r] as usize)));
    let top = grad.iter().fold(0f64, |m, g| m.max(g.abs()));
    for scaled in [true, false] {
        let ((li, gi), (lo, go)) = (run(true, scaled), run(false, scaled));
        for (what, l, g) in [("ids", li, &gi), ("one-hot", lo, &go)] {
            let off = g
                .iter()
                .zip(&grad)
                .fold(0f64, |m, (&a, &b)| worse(m, (a as f64 - b).abs()));
            let logits = if scaled { "scaled" } else { "softmax in place" };
            println!("{what}, {logits}: loss {l} (f64 {loss}), gradient {off:.1e} off (values up to {top:.1e})");
            assert!((l - loss).abs() < 1e-6 * loss.abs(), "{what}: loss {l}, f64 {loss}");
            assert!(off < 1e-6 * top, "{what}: gradient {off:.1e} off");
        }
    }
}

/// Rematerialization: the normalised input `rms_norm(x)·w` and the SwiGLU
/// output that an adapter's A gradient reads in the backward are recomputed
/// there instead of held from the forward; every gradient is bit for bit
/// the graph's without it.
#[test]
fn rematerialized_values_give_the_same_gradients() {
    let (d, n, ff, r) = (256usize, 256usize, 300usize, 4usize);
    let mut rng = Rng::new(37);
    let mut vals = |len: usize| (0..len).map(|_| rng.normal()).collect::<Vec<f32>>();
    let (xv, wv, av, gv, uv, bv) = (
        vals(d * n),
        vals(d),
        vals(d * r),
        vals(d * ff),
        vals(d * ff),
        vals(ff * r),
    );
    let run = |remat: bool| {
        let ctx = Context::new(256, 256, true);
        let t = |ne: &[i64]| ctx.new_tensor(GgmlType::F32, ne).set_input();
        let (x, w, a, wg, wu, b) = (
            t(&[d as i64, n as i64]).set_param(),
            t(&[d as i64]),
            t(&[d as i64, r as i64]).set_param(),
            t(&[d as i64, ff as i64]),
            t(&[d as i64, ff as i64]),
            t(&[ff as i64, r as i64]).set_param(),
        );
        // xn = rms_norm(x)·w read by a "LoRA A" product; s = swiglu(g, u)
        // read by another; the loss sums both.
        let xn = ctx.mul(ctx.rms_norm(x, 1e-5), w);
        let s = ctx.swiglu_split(ctx.mul_mat(wg, xn), ctx.mul_mat(wu, xn));
        let loss = ctx.add(
            ctx.sum(ctx.sqr(ctx.mul_mat(a, xn))),
            ctx.sum(ctx.sqr(ctx.mul_mat(b, s))),
        );
        let loss = loss.set_loss().set_output();
        let mut gr = ctx.new_graph(256, true);
        gr.build_forward(loss);
        gr.build_backward(&ctx);
        let recomputed = if remat { gr.rematerialize(&ctx) } else { 0 };
        let backend = Backend::cpu(threads());
        let mut sched = Sched::new(std::slice::from_ref(&backend), 256);
        sched.alloc(&gr).unwrap();
        for (t, v) in [(x, &xv), (w, &wv), (a, &av), (wg, &gv), (wu, &uv), (b, &bv)] {
            t.write_f32(v);
        }
        gr.reset();
        sched.compute(&gr).unwrap();
        let grads = [x, a, b].map(|p| gr.grad(p).unwrap().read_f32());
        (recomputed, loss.read_f32(), grads)
    };
    let ((n_remat, l_remat, g_remat), (_, l_plain, g_plain)) = (run(true), run(false));
    assert_eq!(n_remat, 2, "the normalised input and the SwiGLU output recomputed");
    let differ = |p: &[f32], q: &[f32]| p.iter().zip(q).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(differ(&l_remat, &l_plain), 0, "loss");
    for (what, (p, q)) in ["dx", "dA", "dB"].iter().zip(g_remat.iter().zip(&g_plain)) {
        assert_eq!(differ(p, q), 0, "{what}: values differ");
    }
}

/// `blocks` residual blocks `x ← x + swiglu(c_g·x, c_u·x)` (the gate and up
/// products over scaled identity weights marked for bf16 products) under
/// `Σ r ⊙ x`: a training step with the CPU's kernels, SwiGLU's inputs held
/// in bf16 where `hold`. Returns the first block's SwiGLU output, the
/// input's gradient, the nodes `hold` inserted and the compute buffer's
/// bytes.
fn swiglu_step(n: usize, rows: usize, blocks: usize, (c_g, c_u): (f32, f32), hold: bool) -> SwigluStep {
    let (xv, rv) = swiglu_inputs(n * rows);
    let eye = |c: f32| {
        (0..n * n)
            .map(|i| if i % (n + 1) == 0 { c } else { 0.0 })
            .collect::<Vec<f32>>()
    };
    let backend = Backend::cpu(threads());
    let ctx = Context::new(64, 256, true);
    let x0 = ctx
        .new_tensor(GgmlType::F32, &[n as i64, rows as i64])
        .set_input()
        .set_param();
    let r = ctx.new_tensor(GgmlType::F32, &[n as i64, rows as i64]).set_input();
    let weight = || {
        ctx.new_tensor(GgmlType::F32, &[n as i64, n as i64])
            .set_input()
            .set_bf16_products()
    };
    let (wg, wu) = (weight(), weight());
    let mut x = x0;
    let mut first = None;
    for _ in 0..blocks {
        let h = ctx.swiglu_split(ctx.mul_mat(wg, x), ctx.mul_mat(wu, x));
        first.get_or_insert(h.set_output());
        x = ctx.add(x, h);
    }
    let loss = ctx.sum(ctx.mul(x, r)).set_loss().set_output();
    let mut gr = ctx.new_graph(256, true);
    gr.build_forward(loss);
    gr.build_backward(&ctx);
    gr.gemm_products();
    let held = if hold { gr.hold_swiglu_inputs_bf16(&ctx) } else { 0 };
    let mut sched = Sched::new(std::slice::from_ref(&backend), 256);
    sched.alloc(&gr).unwrap();
    gr.poison_compute_buffers();
    for (t, v) in [(x0, xv), (r, rv), (wg, eye(c_g)), (wu, eye(c_u))] {
        t.write_f32(&v);
    }
    gr.reset();
    sched.compute(&gr).unwrap();
    let h = first.unwrap().read_f32();
    (h, gr.grad(x0).unwrap().read_f32(), held, sched.compute_buffer_bytes())
}

/// [`swiglu_step`]'s input (bf16 values, which the products take as they
/// are) and output weights, `len` of each.
fn swiglu_inputs(len: usize) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(23);
    let x = (0..len)
        .map(|_| half::bf16::from_f32(rng.normal() * 2.0).to_f32())
        .collect();
    (x, (0..len).map(|_| rng.normal()).collect())
}

/// What [`swiglu_step`] returns.
type SwigluStep = (Vec<f32>, Vec<f32>, usize, usize);

/// In a training graph of bf16 products, SwiGLU's inputs (the gate and up
/// projections' outputs) are held in bf16, as torch's autocast holds
/// linear outputs: SwiGLU reads them rounded (its values match an f64
/// evaluation over the rounded inputs to float rounding, and differ from
/// one over the F32 inputs by far more), the input's gradient matches f64
/// through them, and the step's compute buffer shrinks.
#[test]
fn swiglu_inputs_held_in_bf16() {
    if !gguf_peft::ggml::bf16_products_supported() {
        eprintln!("skipped: this CPU has no AVX512-BF16 (no bf16 products, SwiGLU's inputs stay F32)");
        return;
    }
    let (n, rows) = (72usize, 40usize);
    // Their products with bf16 values are exact in F32 but not in bf16.
    let (c_g, c_u) = (1.0 + 1.0 / 128.0, -(1.0 + 3.0 / 128.0));
    let (h, dx, held, _) = swiglu_step(n, rows, 1, (c_g, c_u), true);
    assert_eq!(held, 2, "the gate and up outputs are rounded by two new nodes");
    let round = |v: f64| half::bf16::from_f64(v).to_f64();
    let (xv, rv) = swiglu_inputs(n * rows);
    let silu = |v: f64| v / (1.0 + (-v).exp());
    let (mut want, mut unrounded, mut dx_want) = (vec![], vec![], vec![]);
    for (&x, &r) in xv.iter().zip(&rv) {
        let (x, r) = (x as f64, r as f64);
        let (g, u) = ((c_g as f64 * x) as f32 as f64, (c_u as f64 * x) as f32 as f64);
        let (gb, ub) = (round(g), round(u));
        want.push(silu(gb) * ub);
        unrounded.push(silu(g) * u);
        // d/dx of r·(x + silu(g)·u) through the rounded values (the
        // backward's products round their gradients to bf16 too).
        let s = 1.0 / (1.0 + (-gb).exp());
        let (dg, du) = (r * ub * s * (1.0 + gb * (1.0 - s)), r * silu(gb));
        dx_want.push(r + c_g as f64 * round(dg) + c_u as f64 * round(du));
    }
    let (wh, wu, wd) = (
        worst_relative(&h, &want),
        worst_relative(&h, &unrounded),
        worst_relative(&dx, &dx_want),
    );
    println!(
        "SwiGLU: {wh:.1e} of the largest from f64 over bf16 inputs, {wu:.1e} from f64 over F32 inputs; dx {wd:.1e}"
    );
    assert!(wh < 1e-6, "SwiGLU values {wh:.1e} from the rounded inputs'");
    assert!(wu > 1e-4, "SwiGLU values only {wu:.1e} from the unrounded inputs'");
    assert!(wd < 1e-2, "input gradient {wd:.1e} from f64's");

    // Four blocks: the backward holds four gates and ups, in half the bytes.
    let ((_, dx_held, held, with), (_, dx_f32, _, without)) = (
        swiglu_step(256, 64, 4, (c_g, c_u), true),
        swiglu_step(256, 64, 4, (c_g, c_u), false),
    );
    let held_bytes = 4 * 2 * 256 * 64 * 2;
    println!("compute buffer: {with} bytes held in bf16, {without} in F32 ({held} nodes)");
    assert_eq!(held, 8);
    assert!(with + held_bytes / 4 <= without, "held {with} bytes, F32 {without}");
    assert!(worst_relative(&dx_held, &dx_f32.iter().map(|&v| v as f64).collect::<Vec<_>>()) < 2e-2);
}
