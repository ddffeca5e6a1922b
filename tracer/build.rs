//! Builds the eBPF probes (crate `tracer-ebpf`) for the bpf target with the nightly toolchain and
//! bpf-linker (`cargo xtask setup` installs both), so `include_bytes_aligned!` can embed them;
//! rebuilds when the embedded Python collection changes.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../tracer-ebpf");
    let root = std::fs::canonicalize(root).context("locating tracer-ebpf")?;
    let root = root.to_str().context("non-UTF-8 path to tracer-ebpf")?;
    println!("cargo:rerun-if-changed={root}/../tracer-common/src");
    // The Python collection is embedded with include_dir!, which cargo cannot see into.
    println!("cargo:rerun-if-changed={}/python/ansible_collections", env!("CARGO_MANIFEST_DIR"));
    aya_build::build_ebpf(
        [aya_build::Package { name: "tracer-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF probes (run `cargo xtask setup` once to install nightly rust-src and bpf-linker)",
    )
}
