//! NF4 dequantization against bitsandbytes' own (fixtures written by
//! tools/make_nf4_fixtures.py with bitsandbytes 0.50.2).

use gguf_peft::convert::nf4::{dequantize, is_nf4};

#[test]
fn dequantization_equals_bitsandbytes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nf4.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut cases = 0;
    for name in st.names() {
        let Some(case) = name.strip_prefix("expected.") else {
            continue;
        };
        assert!(is_nf4(&st, case));
        let (ours, shape) = dequantize(&st, case, path).unwrap();
        let t = st.tensor(name).unwrap();
        assert_eq!(shape, t.shape(), "{case}");
        let want: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let diff = ours
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        println!("{case}: {} values, {diff} differ", want.len());
        assert_eq!(diff, 0, "{case}: not bit-exact");
        cases += 1;
    }
    assert_eq!(cases, 5);
}

#[test]
fn truncated_nf4_data_is_an_error() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nf4.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // Rebuild the file with one weight cut short.
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    for t in &mut tensors {
        if t.0 == "f32_plain.weight" {
            t.2 = vec![100, 1];
            t.3.truncate(100);
        }
    }
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let cut = safetensors::serialize(views, None).unwrap();
    let st = safetensors::SafeTensors::deserialize(&cut).unwrap();
    let e = dequantize(&st, "f32_plain", "cut.safetensors").unwrap_err().to_string();
    assert!(e.contains("cut.safetensors") && e.contains("truncated"), "{e}");
}
