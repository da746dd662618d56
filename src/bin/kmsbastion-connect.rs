//! `kmsbastion-connect`: the engineers' login shell. See `kmsbastion::connect` for argv,
//! environment and exit codes.

fn main() {
    use std::os::unix::ffi::OsStringExt;
    let args: Vec<Vec<u8>> = std::env::args_os().skip(1).map(|a| a.into_vec()).collect();
    let env = kmsbastion::connect::ConnectEnv::from_process();
    let code = kmsbastion::connect::run(&args, &env);
    std::process::exit(i32::from(code));
}
