//! Sets `bpf_target_arch` (also for direct builds) and rebuilds the probes when bpf-linker
//! changes (it is a linker the compiler cannot see).
fn main() -> aya_build::Result<()> {
    match which::which("bpf-linker") {
        Ok(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup`"),
    }
    aya_build::emit_bpf_target_arch_cfg()
}
