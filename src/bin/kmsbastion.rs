//! `kmsbastion`: the bastion administrator's command (see kmsbastion(8)).
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    kmsbastion::cli::main()
}
