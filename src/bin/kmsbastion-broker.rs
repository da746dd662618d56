//! `kmsbastion-broker`: the per-login credential broker, started by `pam_kmsbastion.so`.
//! See `kmsbastion::broker` for argv, environment and files. With `KMSBASTION_ASKPASS` set
//! (only in the onward ssh's environment) it acts as that ssh's askpass.

fn main() {
    if let Some(socket) = kmsbastion::broker::askpass_socket_from_env() {
        std::process::exit(kmsbastion::broker::askpass::client(&socket));
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(kmsbastion::broker::main(&args));
}
