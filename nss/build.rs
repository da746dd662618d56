//! Gives the cdylib the SONAME glibc looks for: `libnss_kmsbastion.so.2` (NSS module
//! interface version 2), so the installed file works with `ldconfig` and `dlopen`.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libnss_kmsbastion.so.2");
    println!("cargo:rerun-if-changed=build.rs");
}
