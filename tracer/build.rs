//! Builds the eBPF probes (crate `tracer-ebpf`) for the bpf target with the nightly toolchain and
//! bpf-linker (`cargo xtask setup` installs both), so `include_bytes_aligned!` can embed them;
//! rebuilds when the embedded Python collection changes.
//!
//! aya-build builds in a target directory under OUT_DIR, which differs per profile and target:
//! clippy, the static release build and the tests would each build the probes from scratch (with
//! `-Z build-std=core`, ~30 s each). It builds them once in `<target dir>/ebpf` instead, under a
//! lock, and the result is copied into this build's OUT_DIR.
use anyhow::Context as _;
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../tracer-ebpf");
    let root = std::fs::canonicalize(root).context("locating tracer-ebpf")?;
    let root = root.to_str().context("non-UTF-8 path to tracer-ebpf")?;
    println!("cargo:rerun-if-changed={root}/../tracer-common/src");
    // The Python collection is embedded with include_dir!, which cargo cannot see into.
    println!("cargo:rerun-if-changed={}/python/ansible_collections", env!("CARGO_MANIFEST_DIR"));
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")),
    };
    let shared = target_dir.join("ebpf");
    std::fs::create_dir_all(&shared).with_context(|| format!("creating {}", shared.display()))?;
    let lock = std::fs::File::create(shared.join("build.lock"))
        .with_context(|| format!("creating {}", shared.join("build.lock").display()))?;
    // one build at a time writes the shared copy (cargo runs build scripts of several profiles
    // at once, e.g. clippy beside a build)
    lock.lock().context("locking the shared eBPF build")?;
    // SAFETY: a build script is single-threaded; aya-build reads OUT_DIR to place its target
    // directory and the probes' binary.
    unsafe { std::env::set_var("OUT_DIR", &shared) };
    let built = aya_build::build_ebpf(
        [aya_build::Package { name: "tracer-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF probes (run `cargo xtask setup` once to install nightly rust-src and bpf-linker)",
    );
    // SAFETY: as above.
    unsafe { std::env::set_var("OUT_DIR", &out_dir) };
    built?;
    let probes = shared.join("tracer-ebpf");
    std::fs::copy(&probes, out_dir.join("tracer-ebpf"))
        .with_context(|| format!("copying {} into {}", probes.display(), out_dir.display()))?;
    Ok(())
}
