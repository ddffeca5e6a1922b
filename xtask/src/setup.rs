//! `cargo xtask setup`: everything a fresh machine needs, each step skipped when already done.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::util::{self, output, root, run};

/// Debian packages the tests and benchmarks use (chromium renders the flamegraphs in a test;
/// opendoas: become through doas).
const APT_PACKAGES: &[&str] = &[
    "strace",
    "openssh-server",
    "openssh-client",
    "iproute2",
    "hyperfine",
    "sudo",
    "opendoas",
    "acl",
    "chromium",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// uv, pinned; it creates the Python environments from their lock files.
const UV_VERSION: &str = "0.13.9";

pub fn setup() -> Result<()> {
    apt_packages(APT_PACKAGES)?;
    build_tools()?;
    tracefs()?;
    python_envs()?;
    eprintln!("setup: done");
    Ok(())
}

/// What building the eBPF probes (nightly rust-src, bpf-linker) and the static build (the musl
/// target's standard library, musl-gcc for the C in signal-hook) needs: all that `cargo xtask
/// install` needs, without the packages and Python environments of the tests.
pub fn build_tools() -> Result<()> {
    nightly_rust_src()?;
    apt_packages(&["musl-tools"])?;
    static_target_std()?;
    bpf_linker()
}

/// The target of spawntrace's static build (what is shipped to SSH targets).
pub fn static_target() -> String {
    format!("{}-unknown-linux-musl", std::env::consts::ARCH)
}

/// The standard library for [`static_target`], for the toolchain that builds spawntrace.
fn static_target_std() -> Result<()> {
    let target = static_target();
    let installed =
        output(Command::new("rustup").args(["target", "list", "--installed"]).current_dir(root()));
    if installed.is_some_and(|t| t.lines().any(|l| l.trim() == target)) {
        return Ok(());
    }
    run(Command::new("rustup").args(["target", "add", &target]).current_dir(root()))
}

fn apt_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing))
}

fn nightly_rust_src() -> Result<()> {
    let installed =
        output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]))
            .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker built against the nightly toolchain's own libLLVM (no prebuilt download here).
fn bpf_linker() -> Result<()> {
    let linker = util::cargo_bin_dir().join("bpf-linker");
    let have = output(Command::new(&linker).arg("--version")).unwrap_or_default();
    if have.ends_with(BPF_LINKER_VERSION) {
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("the nightly toolchain is missing (rustup toolchain install nightly)")?;
    let lib = Path::new(&sysroot).join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let major = llvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .filter(|m| m.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("cannot tell the LLVM version of {llvm}"))?
        .to_owned();
    // bpf-linker keeps a RUNPATH to this prefix, so it must outlive the build.
    let prefix = cache_dir().join("llvm-prefix");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", llvm.as_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&llvm), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    run(Command::new("cargo")
        .args(["+nightly", "install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked", "--force"])
        .args(["--no-default-features", "--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix))
}

fn tracefs() -> Result<()> {
    if Path::new("/sys/kernel/tracing/events/sched").is_dir() {
        return Ok(());
    }
    run(Command::new("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]))
}

pub fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/spawntrace")
}

/// The Python environments, one per `tracer/python/envs/*` (pyproject.toml + uv.lock +
/// .python-version), created with uv from their lock files.
fn python_envs() -> Result<()> {
    let uv = uv()?;
    for env in envs()? {
        let version = std::fs::read_to_string(env.join(".python-version"))
            .with_context(|| format!("{} has no .python-version", env.display()))?;
        let python = find_python(version.trim())?;
        run(Command::new(&uv)
            .args(["sync", "--frozen", "--quiet", "--project"])
            .arg(&env)
            .arg("--python")
            .arg(&python)
            .env("UV_PYTHON_DOWNLOADS", "never"))?;
    }
    Ok(())
}

fn envs_dir() -> PathBuf {
    util::root().join("tracer/python/envs")
}

/// Environment directories, oldest ansible-core first.
pub fn envs() -> Result<Vec<PathBuf>> {
    let dir = envs_dir();
    let mut envs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("pyproject.toml").is_file())
        .collect();
    envs.sort();
    Ok(envs)
}

/// The default environment, named in `tracer/python/envs/default-env` (ansible-core 2.19: the
/// newest line Mitogen supports, with the `ansible` bundle and ruff): the demo, the benchmarks
/// and the lint gate use it, and the whole pytest suite runs on it.
pub fn default_env() -> Result<PathBuf> {
    let dir = envs_dir();
    let named = dir.join("default-env");
    let name = std::fs::read_to_string(&named).with_context(|| format!("reading {}", named.display()))?;
    let env = dir.join(name.trim());
    anyhow::ensure!(
        env.join("pyproject.toml").is_file(),
        "{} names {:?}, which is not an environment",
        named.display(),
        name.trim()
    );
    Ok(env)
}

/// A `pythonX.Y` interpreter: on PATH, else from pyenv.
fn find_python(version: &str) -> Result<PathBuf> {
    let name = format!("python{version}");
    if let Some(p) = output(Command::new("sh").args(["-c", &format!("command -v {name}")]))
        && output(Command::new(&p).arg("--version")).is_some()
    {
        return Ok(PathBuf::from(p));
    }
    let pyenv = PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".pyenv/versions");
    if let Ok(entries) = std::fs::read_dir(&pyenv) {
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{version}.")))
            .map(|e| e.path().join("bin").join(&name))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            return Ok(p);
        }
    }
    bail!("no Python {version} found (looked for {name} on PATH and in {})", pyenv.display())
}

/// uv in a private virtualenv under the cache dir.
fn uv() -> Result<PathBuf> {
    let venv = cache_dir().join("tools");
    let uv = venv.join("bin/uv");
    if output(Command::new(&uv).arg("--version")).is_some_and(|v| v.contains(UV_VERSION)) {
        return Ok(uv);
    }
    let python = find_python("3.11").or_else(|_| which_python3())?;
    run(Command::new(&python).args(["-m", "venv", "--clear"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", &format!("uv=={UV_VERSION}")]))?;
    Ok(uv)
}

fn which_python3() -> Result<PathBuf> {
    output(Command::new("sh").args(["-c", "command -v python3"]))
        .map(PathBuf::from)
        .context("no python3 found")
}
