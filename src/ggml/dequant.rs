//! Rows of quantized weights to f32, vectorized with AVX2 for the common
//! types, bit for bit what ggml's `to_float` writes.
//!
//! ggml's `to_float` lives in ggml-base, which llama-cpp-sys-2 compiles for
//! baseline x86-64 (SSE2). Per value into cache on a Zen 3 core, ggml's →
//! ours: Q4_0 0.91 → 0.18 ns, Q4_1 0.97 → 0.20, Q6_K 1.99 → 0.27, F16 2.43
//! → 0.35, Q8_0 0.28 → 0.19; Q4_K (0.30 → 0.28) and BF16 (equal) were
//! vectorized by the compiler already and are here for one code path. A training step on the CPU dequantizes
//! every frozen weight twice (forward and input gradient, in bands): for
//! SmolLM2-135M in Q4_1 that is 270 M values per step, ~0.3 s of CPU time
//! of a 1.7 s step on 2 cores. Load-time conversions (`--base-compute f32`,
//! merge, quantize) go through here too.
//!
//! The arithmetic is ggml's reference formula per type, in its order, with
//! a separate multiply and add (ggml-base is built without FMA), so the
//! values are identical and a base dequantized at load trains exactly like
//! the same base dequantized in the products.

use llama_cpp_sys_2 as sys;
use std::ffi::c_void;

/// Converts `n` values (whole blocks) at `src` into `dst`.
type RowFn = unsafe fn(*const u8, *mut f32, usize);

/// How rows of one type become f32: a vectorized routine of ours where the
/// CPU and type allow, else ggml's `to_float`.
#[derive(Clone, Copy)]
pub(crate) enum Dequantizer {
    Own(RowFn),
    Ggml(unsafe extern "C" fn(*const c_void, *mut f32, i64)),
}

impl Dequantizer {
    /// The dequantizer for `ty`, or `None` where ggml has no `to_float`.
    pub(crate) fn new(ty: sys::ggml_type) -> Option<Self> {
        if let Some(f) = own(ty) {
            return Some(Self::Own(f));
        }
        // SAFETY: a pure lookup in ggml's static type table; an unknown code
        // is not passed (callers hold types from ggml tensors or GgmlType).
        let traits = unsafe { &*sys::ggml_get_type_traits(ty) };
        traits.to_float.map(Self::Ggml)
    }

    /// Converts `n` values of whole blocks at `src` into `dst`.
    ///
    /// # Safety
    /// `src` must hold `n` values of the type (whole blocks), `dst` room for
    /// `n` floats.
    pub(crate) unsafe fn row(self, src: *const u8, dst: *mut f32, n: usize) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match self {
                Self::Own(f) => f(src, dst, n),
                Self::Ggml(f) => f(src as *const c_void, dst, n as i64),
            }
        }
    }
}

/// Our routine for `ty`, where this CPU has AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
fn own(ty: sys::ggml_type) -> Option<RowFn> {
    if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")) {
        return None;
    }
    Some(match ty {
        sys::GGML_TYPE_Q4_0 => x86::q4_0,
        sys::GGML_TYPE_Q4_1 => x86::q4_1,
        sys::GGML_TYPE_Q8_0 => x86::q8_0,
        sys::GGML_TYPE_Q4_K => x86::q4_k,
        sys::GGML_TYPE_Q6_K => x86::q6_k,
        sys::GGML_TYPE_F16 => x86::f16,
        sys::GGML_TYPE_BF16 => x86::bf16,
        _ => return None,
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn own(_: sys::ggml_type) -> Option<RowFn> {
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! Block layouts (ggml-common.h): Q4_0 = f16 d, 16 bytes of nibbles
    //! (low nibbles values 0–15, high 16–31); Q4_1 = f16 d, f16 m, the same
    //! nibbles; Q8_0 = f16 d, 32 i8; Q4_K = f16 d, f16 dmin, 12 bytes of
    //! packed 6-bit scales and mins, 128 bytes of nibbles (4 × 64 values);
    //! Q6_K = 128 bytes of low nibbles, 64 of 2-bit high parts, 16 i8
    //! scales, f16 d.

    use std::arch::x86_64::*;

    /// The f16 at `p` (unaligned, little-endian) as f32 (exact).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn half(p: *const u8) -> f32 {
        // SAFETY: the caller guarantees two readable bytes.
        let bits = unsafe { (p as *const u16).read_unaligned() };
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// The f16 at `p` as f32 in every lane.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn half_splat(p: *const u8) -> __m256 {
        // SAFETY: the caller guarantees two readable bytes.
        let bits = unsafe { (p as *const u16).read_unaligned() };
        _mm256_cvtph_ps(_mm_set1_epi16(bits as i16))
    }

    /// 16 bytes as floats, unsigned (`signed` false) or signed.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn widen(v: __m128i, signed: bool) -> [__m256; 2] {
        let hi = _mm_srli_si128(v, 8);
        if signed {
            [
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)),
            ]
        } else {
            [
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
            ]
        }
    }

    /// The low and high nibbles of 16 bytes.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn nibbles(q: __m128i) -> [__m128i; 2] {
        let mask = _mm_set1_epi8(0x0F);
        [_mm_and_si128(q, mask), _mm_and_si128(_mm_srli_epi16(q, 4), mask)]
    }

    /// Stores `x · d`, then `+ m` (`add`) or `− m` unless `m` is `None`,
    /// at `y[0..16]`: two roundings, as ggml's reference code.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn store16(y: *mut f32, x: [__m256; 2], d: __m256, m: Option<(__m256, bool)>) {
        for (k, x) in x.into_iter().enumerate() {
            let mut v = _mm256_mul_ps(x, d);
            if let Some((m, add)) = m {
                v = if add { _mm256_add_ps(v, m) } else { _mm256_sub_ps(v, m) };
            }
            // SAFETY: the caller guarantees 16 writable floats at y.
            unsafe { _mm256_storeu_ps(y.add(8 * k), v) };
        }
    }

    /// Q4_0: `(q − 8) · d`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn q4_0(src: *const u8, dst: *mut f32, n: usize) {
        // SAFETY: the caller guarantees n / 32 blocks of 18 bytes at src and
        // n floats at dst.
        unsafe {
            let eight = _mm_set1_epi8(8);
            for i in 0..n / 32 {
                let (b, y) = (src.add(18 * i), dst.add(32 * i));
                let d = half_splat(b);
                let q = nibbles(_mm_loadu_si128(b.add(2) as *const __m128i));
                for (h, q) in q.into_iter().enumerate() {
                    store16(y.add(16 * h), widen(_mm_sub_epi8(q, eight), true), d, None);
                }
            }
        }
    }

    /// Q4_1: `q · d + m`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn q4_1(src: *const u8, dst: *mut f32, n: usize) {
        // SAFETY: n / 32 blocks of 20 bytes at src, n floats at dst.
        unsafe {
            for i in 0..n / 32 {
                let (b, y) = (src.add(20 * i), dst.add(32 * i));
                let (d, m) = (half_splat(b), half_splat(b.add(2)));
                let q = nibbles(_mm_loadu_si128(b.add(4) as *const __m128i));
                for (h, q) in q.into_iter().enumerate() {
                    store16(y.add(16 * h), widen(q, false), d, Some((m, true)));
                }
            }
        }
    }

    /// Q8_0: `q · d`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn q8_0(src: *const u8, dst: *mut f32, n: usize) {
        // SAFETY: n / 32 blocks of 34 bytes at src, n floats at dst.
        unsafe {
            for i in 0..n / 32 {
                let (b, y) = (src.add(34 * i), dst.add(32 * i));
                let d = half_splat(b);
                for h in 0..2 {
                    let q = _mm_loadu_si128(b.add(2 + 16 * h) as *const __m128i);
                    store16(y.add(16 * h), widen(q, true), d, None);
                }
            }
        }
    }

    /// Q4_K's scale and min number `j` (0–7) from its 12 packed bytes.
    #[inline]
    fn scale_min(j: usize, s: &[u8; 12]) -> (u8, u8) {
        if j < 4 {
            (s[j] & 63, s[j + 4] & 63)
        } else {
            (
                (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
                (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
            )
        }
    }

    /// Q4_K: per 32 values `(d · sc) · q − dmin · m`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn q4_k(src: *const u8, dst: *mut f32, n: usize) {
        // SAFETY: n / 256 blocks of 144 bytes at src, n floats at dst.
        unsafe {
            for i in 0..n / 256 {
                let (b, y) = (src.add(144 * i), dst.add(256 * i));
                let (d, dmin) = (half(b), half(b.add(2)));
                let scales = &*(b.add(4) as *const [u8; 12]);
                for j in 0..4 {
                    // 32 bytes: values 64j.. (low nibbles), 64j+32.. (high).
                    for part in 0..2 {
                        let q = nibbles(_mm_loadu_si128(b.add(16 + 32 * j + 16 * part) as *const __m128i));
                        for (h, q) in q.into_iter().enumerate() {
                            let (sc, m) = scale_min(2 * j + h, scales);
                            let (d1, m1) = (_mm256_set1_ps(d * sc as f32), _mm256_set1_ps(dmin * m as f32));
                            let y = y.add(64 * j + 32 * h + 16 * part);
                            store16(y, widen(q, false), d1, Some((m1, false)));
                        }
                    }
                }
            }
        }
    }

    /// Q6_K: per 16 values `(d · sc) · (q − 32)`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn q6_k(src: *const u8, dst: *mut f32, n: usize) {
        // SAFETY: n / 256 blocks of 210 bytes at src, n floats at dst.
        unsafe {
            let (m4, m2, c32) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3), _mm256_set1_epi8(32));
            for i in 0..n / 256 {
                let (b, y) = (src.add(210 * i), dst.add(256 * i));
                let d = half(b.add(208));
                let scales = b.add(192) as *const i8;
                for half_block in 0..2 {
                    let ql = b.add(64 * half_block);
                    let qh = _mm256_loadu_si256(b.add(128 + 32 * half_block) as *const __m256i);
                    let l0 = _mm256_loadu_si256(ql as *const __m256i);
                    let l1 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                    // The four runs of 32 values: low nibbles of l0, of l1,
                    // high nibbles of l0, of l1; each with 2 bits of qh.
                    let lows = [
                        _mm256_and_si256(l0, m4),
                        _mm256_and_si256(l1, m4),
                        _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                        _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                    ];
                    for (r, low) in lows.into_iter().enumerate() {
                        let shift = _mm_cvtsi32_si128(2 * r as i32);
                        let high = _mm256_and_si256(_mm256_srl_epi16(qh, shift), m2);
                        let q = _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 4)), c32);
                        let halves = [_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)];
                        for (s, v) in halves.into_iter().enumerate() {
                            let sc = *scales.add(8 * half_block + 2 * r + s);
                            let ds = _mm256_set1_ps(d * sc as f32);
                            store16(y.add(128 * half_block + 32 * r + 16 * s), widen(v, true), ds, None);
                        }
                    }
                }
            }
        }
    }

    /// F16: exact widening.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn f16(src: *const u8, dst: *mut f32, n: usize) {
        // SAFETY: n halves at src, n floats at dst.
        unsafe {
            let mut i = 0;
            while i + 8 <= n {
                let h = _mm_loadu_si128(src.add(2 * i) as *const __m128i);
                _mm256_storeu_ps(dst.add(i), _mm256_cvtph_ps(h));
                i += 8;
            }
            for i in i..n {
                *dst.add(i) = half(src.add(2 * i));
            }
        }
    }

    /// BF16: the upper half of an f32.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn bf16(src: *const u8, dst: *mut f32, n: usize) {
        // SAFETY: n bf16 values at src, n floats at dst.
        unsafe {
            let mut i = 0;
            while i + 8 <= n {
                let h = _mm_loadu_si128(src.add(2 * i) as *const __m128i);
                let w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
                _mm256_storeu_ps(dst.add(i), _mm256_castsi256_ps(w));
                i += 8;
            }
            for i in i..n {
                let bits = u16::from_le_bytes([*src.add(2 * i), *src.add(2 * i + 1)]);
                *dst.add(i) = f32::from_bits((bits as u32) << 16);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Random blocks of `ty`: random bytes, with each block's f16 scales
    /// replaced by random finite halves (subnormals and negatives
    /// included) so that both sides compute numbers, not NaN payloads.
    fn random_row(ty: sys::ggml_type, n: usize, rng: &mut Rng) -> Vec<u8> {
        // SAFETY: pure queries on a valid type.
        let (blck, size) = unsafe { (sys::ggml_blck_size(ty) as usize, sys::ggml_type_size(ty)) };
        let mut bytes: Vec<u8> = (0..n / blck * size).map(|_| rng.next_u64() as u8).collect();
        let finite_half = |rng: &mut Rng| loop {
            let h = rng.next_u64() as u16;
            if half::f16::from_bits(h).is_finite() {
                return h.to_le_bytes();
            }
        };
        // Byte offsets of the f16 fields in a block.
        let halves: &[usize] = match ty {
            sys::GGML_TYPE_Q4_0 | sys::GGML_TYPE_Q8_0 => &[0],
            sys::GGML_TYPE_Q4_1 | sys::GGML_TYPE_Q4_K => &[0, 2],
            sys::GGML_TYPE_Q6_K => &[208],
            _ => &[],
        };
        for block in bytes.chunks_mut(size) {
            for &o in halves {
                block[o..o + 2].copy_from_slice(&finite_half(rng));
            }
        }
        if ty == sys::GGML_TYPE_F16 {
            for v in bytes.chunks_mut(2) {
                v.copy_from_slice(&finite_half(rng));
            }
        }
        bytes
    }

    /// Every type we vectorize gives ggml's `to_float`'s values bit for bit
    /// (rows of several lengths, odd tails for the plain types).
    #[test]
    fn same_bits_as_ggml() {
        let types = [
            sys::GGML_TYPE_Q4_0,
            sys::GGML_TYPE_Q4_1,
            sys::GGML_TYPE_Q8_0,
            sys::GGML_TYPE_Q4_K,
            sys::GGML_TYPE_Q6_K,
            sys::GGML_TYPE_F16,
            sys::GGML_TYPE_BF16,
        ];
        let mut rng = Rng::new(7);
        for ty in types {
            let Some(Dequantizer::Own(_)) = Dequantizer::new(ty) else {
                eprintln!("type {ty}: no vectorized path on this CPU, nothing to compare");
                continue;
            };
            // SAFETY: pure queries on a valid type.
            let blck = unsafe { sys::ggml_blck_size(ty) } as usize;
            // SAFETY: as above.
            let ggml = unsafe { (*sys::ggml_get_type_traits(ty)).to_float.unwrap() };
            for blocks in [1usize, 3, 40] {
                let n = blocks * blck + if blck == 1 { 5 } else { 0 };
                let row = random_row(ty, n, &mut rng);
                let (mut ours, mut theirs) = (vec![0f32; n], vec![0f32; n]);
                // SAFETY: row holds n values of ty; both outputs n floats.
                unsafe {
                    Dequantizer::new(ty).unwrap().row(row.as_ptr(), ours.as_mut_ptr(), n);
                    ggml(row.as_ptr() as *const c_void, theirs.as_mut_ptr(), n as i64);
                }
                for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "type {ty}, {n} values: value {i} is {a}, ggml's {b}"
                    );
                }
            }
        }
    }
}
