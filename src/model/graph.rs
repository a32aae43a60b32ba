//! The graph builder shared by all architectures: inputs (tokens, positions,
//! masks), the hooked weight matmul, and the common blocks (RMS norm,
//! attention, gated FFN). Architecture files compose these.

use super::hooks::{Hooks, Site, TensorKind};
use super::Hparams;
use crate::ggml::{Context, GgmlType, Tensor, TensorStore};
use std::cell::RefCell;

/// Tokens to run: one flat stream of one or more packed sequences.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub tokens: Vec<i32>,
    /// Position of each token within its sequence.
    pub pos: Vec<i32>,
    /// Sequence id of each token; attention never crosses sequences.
    pub seq: Vec<u32>,
    /// Rows whose final hidden state is wanted (logits, loss); `None` = all.
    pub outputs: Option<Vec<i32>>,
}

impl Batch {
    /// One sequence starting at position 0, every position an output.
    pub fn single(tokens: &[i32]) -> Self {
        Batch {
            tokens: tokens.to_vec(),
            pos: (0..tokens.len() as i32).collect(),
            seq: vec![0; tokens.len()],
            outputs: None,
        }
    }
}

/// Keys and values of earlier positions of one sequence (after RoPE), per
/// layer, so that generation runs one new token per step as llama.cpp does.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Positions cached (virtual tokens included).
    pub n_past: usize,
    /// How many of them are virtual tokens (at the start).
    pub n_virtual: usize,
    /// Per layer: `[head_dim, n_head_kv, n_past]` keys, flattened.
    pub k: Vec<Vec<f32>>,
    /// Per layer: `[head_dim_v, n_head_kv, n_past]` values, flattened.
    pub v: Vec<Vec<f32>>,
}

/// KV cells are allocated in multiples of this (as llama.cpp does).
const KV_PAD: usize = 256;

/// One row of the residual stream: where its embedding comes from (an index
/// into `[virtual tokens; batch tokens]`), its position and sequence.
#[derive(Debug, Clone, Copy)]
struct Row {
    src: usize,
    pos: i32,
    seq: u32,
}

enum InputData {
    I32(Vec<i32>),
    F32(Vec<f32>),
}

/// Builds one forward graph over a [`Batch`]. Holds the inputs it creates so
/// that [`Forward::fill_inputs`] can write them once the graph is allocated.
pub struct Forward<'a> {
    pub ctx: &'a Context,
    pub hp: &'a Hparams,
    pub hooks: &'a dyn Hooks,
    /// RoPE mode of the architecture (0 normal, 2 NeoX).
    pub rope_mode: i32,
    /// Whether gradients will flow through this graph: ops without a ggml
    /// backward are then replaced by compositions of ops that have one.
    pub differentiable: bool,
    weights: &'a TensorStore,
    batch: &'a Batch,
    /// The residual stream's rows: virtual tokens inserted before each
    /// sequence that starts in the batch, then the batch's tokens.
    rows: Vec<Row>,
    /// Virtual tokens per inserted block (0 when none were inserted).
    n_virtual: usize,
    pos: Option<Tensor<'a>>,
    masks: Vec<(bool, usize, Tensor<'a>)>,
    inputs: RefCell<Vec<(Tensor<'a>, InputData)>>,
    cache: Option<&'a KvCache>,
    /// Per layer: the full keys and values (cached + new), marked as outputs.
    kv_out: Vec<(Tensor<'a>, Tensor<'a>)>,
}

impl<'a> Forward<'a> {
    /// A builder over `batch` with these weights and hooks.
    pub fn new(
        ctx: &'a Context,
        hp: &'a Hparams,
        weights: &'a TensorStore,
        hooks: &'a dyn Hooks,
        rope_mode: i32,
        batch: &'a Batch,
        differentiable: bool,
    ) -> Self {
        let mut f = Forward {
            ctx,
            hp,
            hooks,
            rope_mode,
            differentiable,
            weights,
            batch,
            rows: Vec::new(),
            n_virtual: 0,
            pos: None,
            masks: Vec::new(),
            inputs: RefCell::new(Vec::new()),
            cache: None,
            kv_out: Vec::new(),
        };
        f.lay_out_rows();
        f
    }

    /// Places virtual tokens before every sequence that starts in this batch
    /// (position 0, nothing cached) and shifts real tokens past the virtual
    /// positions.
    fn lay_out_rows(&mut self) {
        let nv = self.hooks.n_virtual_tokens();
        let shift = self.hooks.n_virtual_positions() as i32;
        let continuing = self.cache.is_some_and(|c| c.n_past > 0);
        let b = self.batch;
        let inserted = nv > 0 && !continuing && b.pos.contains(&0);
        self.n_virtual = if inserted { nv } else { 0 };
        let mut rows = Vec::with_capacity(b.tokens.len() + nv);
        for t in 0..b.tokens.len() {
            if inserted && b.pos[t] == 0 {
                rows.extend((0..nv).map(|j| Row {
                    src: j,
                    pos: j as i32,
                    seq: b.seq[t],
                }));
            }
            rows.push(Row {
                src: self.n_virtual + t,
                pos: b.pos[t] + shift,
                seq: b.seq[t],
            });
        }
        self.rows = rows;
    }

    /// Attends over `cache` before the batch's own tokens (which must then
    /// continue the cached sequence), and records every layer's full keys and
    /// values as outputs for [`Forward::read_cache`].
    pub fn with_cache(mut self, cache: &'a KvCache) -> Self {
        self.cache = Some(cache);
        self.lay_out_rows();
        self
    }

    /// The keys and values of all positions so far, after compute.
    pub fn read_cache(&self) -> KvCache {
        let n_past = self.cache.map_or(0, |c| c.n_past) + self.n_rows();
        let n_virtual = match self.cache {
            Some(c) if c.n_past > 0 => c.n_virtual,
            _ => self.n_virtual,
        };
        KvCache {
            n_past,
            n_virtual,
            k: self.kv_out.iter().map(|(k, _)| k.read_f32()).collect(),
            v: self.kv_out.iter().map(|(_, v)| v.read_f32()).collect(),
        }
    }

    fn input_i32(&self, name: &str, data: Vec<i32>) -> Tensor<'a> {
        let t = self
            .ctx
            .new_tensor(GgmlType::I32, &[data.len() as i64])
            .set_name(name)
            .set_input();
        self.inputs.borrow_mut().push((t, InputData::I32(data)));
        t
    }

    fn input_f32(&self, name: &str, ne: &[i64], data: Vec<f32>) -> Tensor<'a> {
        let t = self.ctx.new_tensor(GgmlType::F32, ne).set_name(name).set_input();
        self.inputs.borrow_mut().push((t, InputData::F32(data)));
        t
    }

    /// Writes every input tensor; call after the graph is allocated.
    pub fn fill_inputs(&self) {
        for (t, d) in self.inputs.borrow().iter() {
            match d {
                InputData::I32(v) => t.write_i32(v),
                InputData::F32(v) => t.write_f32(v),
            }
        }
    }

    /// A model weight by GGUF name (presence was validated at load).
    pub fn weight(&self, name: &str) -> Tensor<'a> {
        self.weights
            .get(name)
            .unwrap_or_else(|| panic!("weight '{name}' missing after validation"))
    }

    /// A model weight if the file has it.
    pub fn weight_opt(&self, name: &str) -> Option<Tensor<'a>> {
        self.weights.get(name)
    }

    /// Token embeddings of the batch, multiplied by `scale` first (Gemma
    /// scales by sqrt(n_embd)), with the adapter's virtual tokens inserted
    /// before each sequence that starts in the batch.
    pub fn embeddings(&mut self, scale: f32) -> Tensor<'a> {
        let ids = self.input_i32("tokens", self.batch.tokens.clone());
        let site = Site {
            layer: None,
            kind: TensorKind::TokenEmbd,
            weight: "token_embd.weight".into(),
        };
        let w = self.weight(&site.weight);
        let mut x = self.hooks.embed(self.ctx, &site, w, ids);
        if scale != 1.0 {
            x = self.ctx.scale(x, scale);
        }
        if self.n_virtual == 0 {
            return x;
        }
        let hooks = self.hooks;
        let v = hooks
            .virtual_tokens(self)
            .expect("an adapter with virtual tokens provides them");
        assert_eq!(v.ne()[1] as usize, self.n_virtual, "virtual token count");
        let table = self.concat(v, x, 1);
        let identity = self.rows.iter().enumerate().all(|(i, r)| r.src == i);
        if identity {
            return table;
        }
        let idx = self.input_i32("row_src", self.rows.iter().map(|r| r.src as i32).collect());
        self.ctx.get_rows(table, idx)
    }

    /// Concatenation along `dim` that has a backward when the graph needs
    /// one (ggml's CONCAT has none): both parts accumulated into zeros.
    /// ggml's ACC backward reads the incoming gradient with the result's
    /// strides, so the result must be consumed by ops whose backward gives
    /// a contiguous gradient (matmuls, element-wise ops, norms) — not
    /// through a permute.
    pub fn concat(&self, a: Tensor<'a>, b: Tensor<'a>, dim: usize) -> Tensor<'a> {
        let c = self.ctx;
        if !self.differentiable {
            let a = if a.is_contiguous() { a } else { c.cont(a) };
            let b = if b.is_contiguous() { b } else { c.cont(b) };
            return c.concat(a, b, dim as i32);
        }
        let mut ne = a.ne();
        ne[dim] += b.ne()[dim];
        let n: i64 = ne.iter().product();
        let z = self.input_f32("concat_zeros", &ne, vec![0.0; n as usize]);
        let nb = z.nb();
        let a = if a.is_contiguous() { a } else { c.cont(a) };
        let b = if b.is_contiguous() { b } else { c.cont(b) };
        let t = c.acc(z, a, nb, 0);
        c.acc(t, b, nb, a.ne()[dim] as usize * nb[dim])
    }

    /// Number of rows in the residual stream (virtual + real tokens).
    pub fn n_rows(&self) -> usize {
        self.rows.len()
    }

    /// Positions of all rows (virtual tokens first, real ones shifted after).
    pub fn positions(&mut self) -> Tensor<'a> {
        if let Some(p) = self.pos {
            return p;
        }
        let t = self.input_i32("pos", self.rows.iter().map(|r| r.pos).collect());
        self.pos = Some(t);
        t
    }

    /// The additive attention mask `[n_prefix + n_past + n_rows, n_rows]`:
    /// causal within each sequence, prefix entries visible to all, cached
    /// positions before the batch's, and for `swa` layers only the last
    /// `sliding_window` positions.
    pub fn mask(&mut self, swa: bool, n_prefix: usize) -> Tensor<'a> {
        if let Some(&(_, _, t)) = self.masks.iter().find(|(s, p, _)| *s == swa && *p == n_prefix) {
            return t;
        }
        let rows: Vec<(i32, u32)> = self.rows.iter().map(|r| (r.pos, r.seq)).collect();
        let n = rows.len();
        let s0 = self.batch.seq.first().copied().unwrap_or(0);
        // Cached rows are consecutive positions; the cache's virtual tokens
        // take positions too, so the shift left is what they do not cover.
        let (n_past, cache_shift) = self.cache.map_or((0, 0), |c| {
            (c.n_past, self.hooks.n_virtual_positions() as i32 - c.n_virtual as i32)
        });
        let keys: Vec<(i32, u32)> = (0..n_past as i32)
            .map(|p| (p + cache_shift, s0))
            .chain(rows.iter().copied())
            .collect();
        let n_kv = n_prefix + keys.len() + self.cache_pad();
        let window = self.hp.sliding_window as i32;
        let mut m = vec![f32::NEG_INFINITY; n_kv * n];
        for (q, &(pq, sq)) in rows.iter().enumerate() {
            let row = &mut m[q * n_kv..(q + 1) * n_kv];
            row[..n_prefix].fill(0.0);
            for (k, &(pk, sk)) in keys.iter().enumerate() {
                let visible = sk == sq && pk <= pq && !(swa && pq - pk >= window);
                if visible {
                    row[n_prefix + k] = 0.0;
                }
            }
        }
        // How far past its own row a query sees (prefix and past keys
        // come first): the GEMM skips what lies beyond.
        let off = m
            .chunks(n_kv)
            .enumerate()
            .filter_map(|(q, row)| row.iter().rposition(|&v| v == 0.0).map(|j| j.saturating_sub(q)))
            .max()
            .unwrap_or(0);
        let t = self.input_f32(if swa { "kq_mask_swa" } else { "kq_mask" }, &[n_kv as i64, n as i64], m);
        let t = if off + 1 < n_kv { t.set_causal_offset(off) } else { t };
        self.masks.push((swa, n_prefix, t));
        t
    }

    /// `W x` through the `linear` hook, for a block weight (`layer` Some) or a
    /// global one; adds the model's bias `<stem>.bias` when the file has one,
    /// then the `bias` hook.
    pub fn linear(&self, layer: Option<usize>, kind: TensorKind, x: Tensor<'a>) -> Tensor<'a> {
        let stem = match layer {
            Some(il) => format!("blk.{il}.{}", kind.gguf_name()),
            None => kind.gguf_name().to_string(),
        };
        let site = Site {
            layer,
            kind,
            weight: format!("{stem}.weight"),
        };
        self.linear_at(&site, x, self.weight_opt(&format!("{stem}.bias")))
    }

    /// `W x (+ b)` for an explicit site (e.g. a tied output head).
    pub fn linear_at(&self, site: &Site, x: Tensor<'a>, bias: Option<Tensor<'a>>) -> Tensor<'a> {
        let w = self.weight(&site.weight);
        let mut y = self.hooks.linear(self.ctx, site, w, x);
        if let Some(b) = bias {
            y = self.ctx.add(y, b);
        }
        self.hooks.bias(self.ctx, site, y)
    }

    /// RMS norm of each column times the named weight.
    pub fn rms_norm(&self, x: Tensor<'a>, weight: &str) -> Tensor<'a> {
        let n = self.ctx.rms_norm(x, self.hp.rms_eps);
        self.ctx.mul(n, self.weight(weight))
    }

    /// RoPE on `[head_dim, heads, rows]` with this layer's base frequency and
    /// frequency scale.
    pub fn rope(&mut self, x: Tensor<'a>, freq_base: f32, freq_scale: f32) -> Tensor<'a> {
        let pos = self.positions();
        self.ctx.rope_ext(
            x,
            pos,
            self.hp.n_rot as i32,
            self.rope_mode,
            self.hp.n_ctx_train as i32,
            freq_base,
            freq_scale,
        )
    }

    /// Multi-head attention of `q` `[hd, n_head, n]` over `k`, `v`
    /// `[hd, n_head_kv, n]` (after RoPE) and the adapter's prefix; returns
    /// `[hd_v * n_head, n]`. Built from mul_mat and soft_max so it has a backward.
    pub fn attention(
        &mut self,
        layer: usize,
        q: Tensor<'a>,
        k: Tensor<'a>,
        v: Tensor<'a>,
        scale: f32,
        swa: bool,
    ) -> Tensor<'a> {
        let c = self.ctx;
        let (k, v) = self.extend_with_cache(layer, k, v);
        let hooks = self.hooks;
        let prefix = hooks.attn_kv_prefix(self, layer);
        let n_prefix = prefix.map_or(0, |(pk, _)| pk.ne()[2] as usize);
        let mask = self.mask(swa, n_prefix);
        let n = q.ne()[2];
        let mut q = c.permute(q, [0, 2, 1, 3]); // [hd, n, n_head]
        let mut k = c.permute(k, [0, 2, 1, 3]); // [hd, n_kv, n_head_kv]
        if self.differentiable {
            // Contiguous operands make the backward products (OUT_PROD on
            // these) run on contiguous rows; the forward values are the same.
            q = c.cont(q);
            k = c.cont(k);
        }
        let mut vt = c.cont(c.permute(v, [1, 2, 0, 3])); // [n_kv, hd_v, n_head_kv]
        if let Some((pk, pv)) = prefix {
            // Joined after the permutes, so that the gradients reaching the
            // joins arrive contiguous (see `concat`).
            k = self.concat(c.cont(c.permute(pk, [0, 2, 1, 3])), k, 1);
            vt = self.concat(c.cont(c.permute(pv, [1, 2, 0, 3])), vt, 0);
        }
        let (n_head, n_head_kv) = (self.hp.n_head as i64, self.hp.n_head_kv as i64);
        // GQA in training: the query heads of one KV head are adjacent, so
        // stacking them as rows makes each product one plain matmul per KV
        // head instead of a broadcast one (and so its backward). Inference
        // keeps llama.cpp's broadcast shapes for bit-identical logits.
        let group = self.differentiable && n_head != n_head_kv;
        let grouped = |t: Tensor<'a>| {
            let [a, b, _, _] = t.ne();
            c.reshape(t, &[a, b * (n_head / n_head_kv), n_head_kv])
        };
        let ungrouped = |t: Tensor<'a>| c.reshape(t, &[t.ne()[0], n, n_head]);
        let kq = if group {
            ungrouped(c.mul_mat(k, grouped(q)))
        } else {
            c.mul_mat(k, q)
        }; // [n_kv, n, n_head]
        let kq = c.soft_max_ext(kq, Some(mask), scale);
        let kqv = if group {
            ungrouped(c.mul_mat(vt, grouped(kq)))
        } else {
            c.mul_mat(vt, kq)
        }; // [hd_v, n, n_head]
        let o = c.cont(c.permute(kqv, [0, 2, 1, 3])); // [hd_v, n_head, n]
        c.reshape(o, &[(self.hp.head_dim_v * self.hp.n_head) as i64, n])
    }

    /// Empty cells after the keys when a cache is used: llama.cpp rounds its
    /// KV cells up to 256, and padding the same way makes every step run the
    /// same kernels on the same shapes (so greedy output matches exactly).
    fn cache_pad(&self) -> usize {
        match self.cache {
            Some(c) => {
                let n = c.n_past + self.n_rows();
                n.next_multiple_of(KV_PAD) - n
            }
            None => 0,
        }
    }

    /// Prepends this layer's cached keys and values (when generating with a
    /// cache), records the result as an output, and pads it with empty cells.
    fn extend_with_cache(&mut self, layer: usize, k: Tensor<'a>, v: Tensor<'a>) -> (Tensor<'a>, Tensor<'a>) {
        let Some(cache) = self.cache else {
            return (k, v);
        };
        let c = self.ctx;
        let (k, v) = if cache.n_past > 0 {
            let [hk, nk, _, _] = k.ne();
            let [hv, nv, _, _] = v.ne();
            let np = cache.n_past as i64;
            let pk = self.input_f32(&format!("past_k.{layer}"), &[hk, nk, np], cache.k[layer].clone());
            let pv = self.input_f32(&format!("past_v.{layer}"), &[hv, nv, np], cache.v[layer].clone());
            (c.concat(pk, k, 2), c.concat(pv, v, 2))
        } else {
            (c.cont(k), c.cont(v))
        };
        let (k, v) = (k.set_output(), v.set_output());
        self.kv_out.push((k, v));
        let pad = self.cache_pad() as i64;
        if pad == 0 {
            return (k, v);
        }
        let [hk, nk, _, _] = k.ne();
        let [hv, nv, _, _] = v.ne();
        let zk = self.input_f32(
            &format!("pad_k.{layer}"),
            &[hk, nk, pad],
            vec![0.0; (hk * nk * pad) as usize],
        );
        let zv = self.input_f32(
            &format!("pad_v.{layer}"),
            &[hv, nv, pad],
            vec![0.0; (hv * nv * pad) as usize],
        );
        (c.concat(k, zk, 2), c.concat(v, zv, 2))
    }

    /// Splits `[heads*hd, n]` into `[hd, heads, n]`.
    pub fn heads(&self, x: Tensor<'a>, hd: usize, heads: usize) -> Tensor<'a> {
        let n = x.ne()[1];
        self.ctx.reshape(x, &[hd as i64, heads as i64, n])
    }

    /// `gelu(g) * u` (tanh approximation): ggml's fused op when no gradient is
    /// needed (bit-identical to llama.cpp), else [`Forward::gelu_tanh`].
    pub fn geglu(&self, g: Tensor<'a>, u: Tensor<'a>) -> Tensor<'a> {
        if self.differentiable {
            self.ctx.mul(self.gelu_tanh(g), u)
        } else {
            self.ctx.geglu_split(g, u)
        }
    }

    /// GELU, tanh approximation, from ops that have a backward:
    /// `0.5 x (1 + tanh(z)) = x · sigmoid(2z) = x · exp(-softplus(-2z))`,
    /// `z = sqrt(2/π) (x + 0.044715 x³)`.
    pub fn gelu_tanh(&self, x: Tensor<'a>) -> Tensor<'a> {
        let c = self.ctx;
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        let x3 = c.mul(c.sqr(x), x);
        let inner = c.add(x, c.scale(x3, 0.044715));
        let sp = c.softplus(c.scale(inner, -2.0 * SQRT_2_OVER_PI));
        c.mul(x, c.exp(c.scale(sp, -1.0)))
    }

    /// Keeps only the output rows of the batch (before the LM head).
    pub fn select_outputs(&self, x: Tensor<'a>) -> Tensor<'a> {
        if self.n_virtual == 0 && self.batch.outputs.is_none() {
            return x;
        }
        // Residual row of each batch token.
        let token_row: Vec<i32> = (0..self.rows.len())
            .filter(|&i| self.rows[i].src >= self.n_virtual)
            .map(|i| i as i32)
            .collect();
        let rows: Vec<i32> = match &self.batch.outputs {
            Some(o) => o.iter().map(|&r| token_row[r as usize]).collect(),
            None => token_row,
        };
        let ids = self.input_i32("out_ids", rows);
        self.ctx.get_rows(x, ids)
    }

    /// The LM head: `output.weight`, or the token embedding when tied.
    pub fn lm_head(&self, x: Tensor<'a>) -> Tensor<'a> {
        let weight = if self.weight_opt("output.weight").is_some() {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let site = Site {
            layer: None,
            kind: TensorKind::Output,
            weight: weight.to_string(),
        };
        self.linear_at(&site, x, None)
    }
}
