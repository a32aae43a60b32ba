//! Datasets: record shapes and which tokens carry loss.

mod common;
use common::*;
use gguf_peft::data::{pack, parse_record, tokenize, Record, TokenizeOptions};
use gguf_peft::gguf::GgufFile;
use gguf_peft::tokenizer::Tokenizer;

fn tok() -> Tokenizer {
    let p = smollm2();
    Tokenizer::load(&p, &GgufFile::open(&p).unwrap()).unwrap()
}

fn rec(s: &str) -> Record {
    parse_record(&serde_json::from_str(s).unwrap()).unwrap()
}

/// The text of the tokens that carry loss (as targets).
fn loss_text(t: &Tokenizer, tokens: &[i32], loss: &[bool]) -> String {
    let sel: Vec<i32> = tokens
        .iter()
        .zip(loss)
        .skip(1)
        .filter(|(_, &l)| l)
        .map(|(&x, _)| x)
        .collect();
    t.decode(&sel)
}

#[test]
fn loss_only_on_completions_and_assistant_turns() {
    let t = tok();
    let o = TokenizeOptions {
        train_on_prompt: false,
        max_seq_len: 512,
        labels: Vec::new(),
    };
    let recs = vec![
        rec(r#"{"prompt": "Translate to French: cat =>", "completion": " chat"}"#),
        rec(
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]}"#,
        ),
        rec(r#"{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}"#),
        rec(r#"{"text": "Plain text is all loss."}"#),
    ];
    let (ex, st) = tokenize(&recs, &t, &o).unwrap();
    assert_eq!(st.n_examples, 4);
    assert_eq!(loss_text(&t, &ex[0].tokens, &ex[0].loss), " chat<|im_end|>");
    assert_eq!(
        loss_text(&t, &ex[1].tokens, &ex[1].loss),
        "Hello!<|im_end|>\nSee you.<|im_end|>\n"
    );
    assert_eq!(loss_text(&t, &ex[2].tokens, &ex[2].loss), "5<|im_end|>\n");
    let full = t.decode(&ex[2].tokens);
    assert!(full.contains("Add the numbers.\n\n2 and 3"), "{full}");
    // Plain text: every token after the first is a target, then EOS.
    assert_eq!(loss_text(&t, &ex[3].tokens, &ex[3].loss), t.decode(&ex[3].tokens[1..]));
    assert!(t.decode(&ex[3].tokens).ends_with("all loss.<|im_end|>"));
    // The whole rendering is one tokenization of the full text.
    let rendered = t
        .apply_chat_template(
            match &recs[1] {
                Record::Chat(m) => m,
                _ => unreachable!(),
            },
            false,
        )
        .unwrap();
    assert_eq!(ex[1].tokens, t.encode(&rendered, true));

    let all = TokenizeOptions {
        train_on_prompt: true,
        ..o.clone()
    };
    let (ex2, _) = tokenize(&recs[..1], &t, &all).unwrap();
    assert!(ex2[0].loss.iter().all(|&l| l));
}

#[test]
fn truncation_is_counted_and_packing_respects_the_limit() {
    let t = tok();
    let long = format!(r#"{{"text": "{}"}}"#, "word ".repeat(300));
    let recs = vec![
        rec(&long),
        rec(r#"{"text": "short one"}"#),
        rec(r#"{"text": "another short one"}"#),
    ];
    let o = TokenizeOptions {
        train_on_prompt: false,
        max_seq_len: 64,
        labels: Vec::new(),
    };
    let (ex, st) = tokenize(&recs, &t, &o).unwrap();
    assert_eq!(st.n_truncated, 1);
    assert_eq!(ex[0].tokens.len(), 64);
    let lengths: Vec<usize> = ex.iter().map(|e| e.tokens.len()).collect();
    let packs = pack(&lengths, 64);
    assert_eq!(
        packs,
        vec![vec![0], vec![1, 2]],
        "the long one alone, the two short ones together"
    );
}
