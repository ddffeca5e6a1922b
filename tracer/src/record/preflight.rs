//! Checks that must pass before anything is loaded or run, each failing with one clear line.
use std::path::Path;

use anyhow::{Result, bail};

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Root, or CAP_BPF + CAP_PERFMON (CAP_SYS_ADMIN implies both).
pub fn privileges() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1 << cap) != 0;
    if !(has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))) {
        bail!(
            "loading eBPF probes needs root (or CAP_BPF and CAP_PERFMON): run `sudo spawntrace -- COMMAND`"
        );
    }
    Ok(())
}

/// The kernel's BTF, needed to find struct offsets.
pub fn btf() -> Result<()> {
    if !Path::new(super::btf::VMLINUX).exists() {
        bail!(
            "this kernel exposes no BTF ({} is missing): spawntrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y",
            super::btf::VMLINUX
        );
    }
    Ok(())
}
