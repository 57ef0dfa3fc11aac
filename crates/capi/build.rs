//! The shared library's SONAME is libblkio's, so programs linked against libblkio
//! (`-lblkio`, NEEDED libblkio.so.1) load vireo's library unchanged.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libblkio.so.1");
    println!("cargo:rerun-if-changed=build.rs");
}
