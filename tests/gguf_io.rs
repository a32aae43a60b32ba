//! GGUF writer and reader: round trip of every metadata type and several
//! quant types, checked against ggml's own reader.

mod common;
use common::*;
use gguf_peft::ggml::{ggml_accepts_gguf, GgmlType};
use gguf_peft::gguf::{GgufFile, GgufWriter, TensorSpec, Value, ValueType};
use gguf_peft::rng::Rng;
use std::borrow::Cow;

fn all_values() -> Vec<(String, Value)> {
    vec![
        ("t.u8".into(), Value::U8(200)),
        ("t.i8".into(), Value::I8(-100)),
        ("t.u16".into(), Value::U16(60000)),
        ("t.i16".into(), Value::I16(-30000)),
        ("t.u32".into(), Value::U32(4_000_000_000)),
        ("t.i32".into(), Value::I32(-2_000_000_000)),
        ("t.f32".into(), Value::F32(3.25)),
        ("t.bool".into(), Value::Bool(true)),
        ("t.string".into(), Value::String("héllo ✓".into())),
        ("t.u64".into(), Value::U64(u64::MAX - 1)),
        ("t.i64".into(), Value::I64(i64::MIN + 1)),
        ("t.f64".into(), Value::F64(-1.0e300)),
        (
            "t.arr_i32".into(),
            Value::Array(ValueType::I32, vec![Value::I32(1), Value::I32(-2)]),
        ),
        (
            "t.arr_str".into(),
            Value::Array(
                ValueType::String,
                vec![Value::String("a".into()), Value::String("".into())],
            ),
        ),
        ("t.arr_empty".into(), Value::Array(ValueType::F32, vec![])),
    ]
}

#[test]
fn round_trip_metadata_and_tensors() {
    let dir = tmpdir("gguf-rt");
    let path = dir.join("rt.gguf");
    let mut w = GgufWriter::new();
    for (k, v) in all_values() {
        w.set(k, v);
    }
    let mut rng = Rng::new(5);
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_K,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_NL,
    ];
    let mut datas = Vec::new();
    for (i, ty) in types.iter().enumerate() {
        let ne = vec![256u64, 3 + i as u64];
        let vals: Vec<f32> = (0..ne[0] * ne[1]).map(|_| rng.normal()).collect();
        let bytes = if *ty == GgmlType::F32 {
            vals.iter().flat_map(|x| x.to_le_bytes()).collect()
        } else {
            ty.from_f32(&vals, 256)
        };
        w.add_tensor(TensorSpec {
            name: format!("tensor.{}", ty.name()),
            ty: *ty,
            ne,
        });
        datas.push(bytes);
    }
    w.write(&path, |i| Ok(Cow::Borrowed(&datas[i][..]))).unwrap();

    let f = GgufFile::open(&path).unwrap();
    for (k, v) in all_values() {
        assert_eq!(f.get(&k), Some(&v), "key {k}");
    }
    assert_eq!(f.metadata().len(), all_values().len());
    for (i, ty) in types.iter().enumerate() {
        let t = f.tensor(&format!("tensor.{}", ty.name())).unwrap();
        assert_eq!(t.ty, *ty);
        assert_eq!(t.ne, vec![256, 3 + i as u64]);
        assert_eq!(f.tensor_data(t), &datas[i][..], "data of {}", ty.name());
    }
    // ggml's own reader accepts the file and counts the same entries.
    let (n_kv, n_t) = ggml_accepts_gguf(&path).unwrap();
    assert_eq!((n_kv as usize, n_t as usize), (all_values().len(), types.len()));
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn quantize_dequantize_round_trip_is_close() {
    let mut rng = Rng::new(9);
    let vals: Vec<f32> = (0..1024).map(|_| rng.normal()).collect();
    for (ty, tol) in [
        (GgmlType::F16, 1e-3),
        (GgmlType::Q8_0, 2e-2),
        (GgmlType::Q4_K, 0.2),
        (GgmlType::Q4_0, 0.3),
    ] {
        let back = ty.to_f32(&ty.from_f32(&vals, 256), vals.len());
        let err = vals
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, common::worse32);
        println!("{ty}: max round-trip error {err:.2e}");
        assert!(err < tol, "{ty}: {err}");
    }
}

#[test]
fn synthetic_models_load_in_ggml_reader() {
    let dir = tmpdir("gguf-synth");
    let p = synth(&dir, "gemma3", GgmlType::Q4_K);
    assert!(ggml_accepts_gguf(&p).is_ok());
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), "gemma3");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn nested_arrays_are_refused_like_ggml() {
    let dir = tmpdir("gguf-nested");
    let path = dir.join("n.gguf");
    let mut w = GgufWriter::new();
    w.set(
        "x",
        Value::Array(ValueType::Array, vec![Value::Array(ValueType::U8, vec![Value::U8(1)])]),
    );
    let e = w.write(&path, |_| Ok(Cow::Borrowed(&[][..]))).unwrap_err().to_string();
    assert!(e.contains("nested array"), "{e}");
    assert!(!path.exists());
    let _ = std::fs::remove_dir_all(dir);
}

/// Whole-tensor conversions run in chunks on rayon's threads: the bytes
/// and values equal converting each row alone, for tensors spanning
/// several chunks (and a last partial one), under 1 and 3 threads.
#[test]
fn chunked_conversions_equal_row_by_row() {
    let mut rng = Rng::new(11);
    let (rows, cols) = (301, 512);
    let x: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
    for ty in ["q4_0", "q4_1", "q4_K", "q6_K", "q8_0", "iq4_nl", "f16", "bf16"] {
        let ty = GgmlType::from_name(ty).unwrap();
        let row_by_row: Vec<u8> = x.chunks(cols).flat_map(|r| ty.from_f32(r, cols)).collect();
        let rb = ty.row_bytes(cols as u64).unwrap() as usize;
        let back_rows: Vec<f32> = row_by_row.chunks(rb).flat_map(|r| ty.to_f32(r, cols)).collect();
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let (q, back) = pool.install(|| {
                let q = ty.from_f32(&x, cols);
                let back = ty.to_f32(&q, x.len());
                (q, back)
            });
            assert!(q == row_by_row, "{ty}, {threads} threads: bytes differ");
            assert!(back == back_rows, "{ty}, {threads} threads: values differ");
        }
    }
}
