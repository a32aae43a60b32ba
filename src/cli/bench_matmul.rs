//! `gguf-peft bench --matmul-types …`: the frozen-weight matmul alone, per
//! quant type — forward, ggml's stock input gradient (OUT_PROD), the
//! matmul over a transposed F16 copy (GPUs, repacked CPU weights) and the
//! CPU's GEMM over W dequantized as it goes (the CPU's default), each
//! product timed in a graph of its own.

use crate::ggml::{Backend, Context, GgmlType, Sched};
use crate::rng::Rng;
use crate::{Error, Result};
use std::time::Instant;

/// Times of one weight type (median seconds); `None` where ggml cannot run it.
pub struct MatmulTimes {
    /// ggml's forward kernel.
    pub forward: f64,
    /// The forward as a CPU training step runs it (the GEMM for the types
    /// it dequantizes, else ggml's kernel).
    pub forward_gemm: f64,
    pub backward_stock: Option<f64>,
    pub backward_transposed: f64,
    /// The input gradient on the CPU's GEMM, W dequantized into its panels.
    pub backward_gemm: f64,
}

/// Which graph is timed.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// ggml's kernels (OUT_PROD for the input gradient).
    Stock,
    /// The input gradient over the transposed F16 copy.
    Transposed,
    /// Products rewritten for the CPU's GEMM.
    Gemm,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measures `y = W x` with W `[n, n]` of type `ty` and x `[n, tokens]`.
pub fn measure(ty: GgmlType, n: usize, tokens: usize, threads: usize, reps: usize) -> Result<MatmulTimes> {
    if !n.is_multiple_of(ty.block_size() as usize) {
        return Err(Error::Msg(format!(
            "--matmul-n {n} is not a multiple of {ty}'s block size"
        )));
    }
    let backend = Backend::cpu(threads);
    let mut rng = Rng::new(3);
    let wctx = Context::new(4, 0, false);
    wctx.new_tensor(ty, &[n as i64, n as i64]).set_name("w");
    wctx.new_tensor(GgmlType::F16, &[n as i64, n as i64]).set_name("w.T");
    wctx.new_tensor(GgmlType::F32, &[n as i64, tokens as i64]).set_name("x");
    let store = backend.alloc_store(wctx)?;
    let w: Vec<f32> = (0..n * n).map(|_| rng.normal() * 0.05).collect();
    let wq = ty.from_f32(&w, n);
    store.get("w").unwrap().write_bytes(&wq);
    let wd = ty.to_f32(&wq, n * n);
    let mut wt = vec![0f32; n * n];
    for o in 0..n {
        for i in 0..n {
            wt[i * n + o] = wd[o * n + i];
        }
    }
    store.get("w.T").unwrap().write_bytes(&GgmlType::F16.from_f32(&wt, n));
    let xs: Vec<f32> = (0..n * tokens).map(|_| rng.normal()).collect();
    store.get("x").unwrap().write_f32(&xs);
    let mut sched = Sched::new(std::slice::from_ref(&backend), 64);
    // Each graph holds only the product timed: the forward `W·x`, or the
    // input gradient as a training step's backward computes it from an
    // upstream gradient `dy` ([n, tokens], here x's values).
    let run = |sched: &mut Sched, backward: bool, mode: Mode| -> Result<f64> {
        let ctx = Context::new(64, 64, false);
        let (w, x) = (store.get("w").unwrap(), store.get("x").unwrap());
        let y = match (backward, mode) {
            (false, _) => ctx.mul_mat(w, x),
            (true, Mode::Transposed) => ctx.mul_mat(store.get("w.T").unwrap(), x),
            (true, _) => ctx.out_prod(w, ctx.transpose(x)),
        }
        .set_output();
        let mut g = ctx.new_graph(64, false);
        g.build_forward(y);
        if mode == Mode::Gemm {
            g.gemm_products();
        }
        sched.alloc(&g)?;
        let mut times = Vec::new();
        for _ in 0..reps + 1 {
            let t0 = Instant::now();
            sched.compute(&g)?;
            times.push(t0.elapsed().as_secs_f64());
        }
        times.remove(0);
        Ok(median(times))
    };
    let forward = run(&mut sched, false, Mode::Stock)?;
    let forward_gemm = run(&mut sched, false, Mode::Gemm)?;
    let stock = match run(&mut sched, true, Mode::Stock) {
        Ok(t) => Some(t),
        Err(Error::Compute(crate::ggml::ComputeError::Unsupported(_))) => None,
        Err(e) => return Err(e),
    };
    let transposed = run(&mut sched, true, Mode::Transposed)?;
    let gemm = run(&mut sched, true, Mode::Gemm)?;
    Ok(MatmulTimes {
        forward,
        forward_gemm,
        backward_stock: stock,
        backward_transposed: transposed,
        backward_gemm: gemm,
    })
}
