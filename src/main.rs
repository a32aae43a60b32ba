//! The `gguf-peft` binary: everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    gguf_peft::cli::main()
}
