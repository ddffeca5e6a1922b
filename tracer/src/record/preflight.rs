//! Checks that must pass before anything is loaded or run, each failing with one clear line.
use std::path::{Path, PathBuf};

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

/// The tracefs `events/` directory, mounting tracefs at /sys/kernel/tracing if needed.
pub fn tracefs() -> Result<PathBuf> {
    let candidates = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
    for dir in candidates {
        let events = Path::new(dir).join("events");
        if events.join("sched").is_dir() {
            return Ok(events);
        }
    }
    let target = candidates[0];
    let mounted = nix::mount::mount(
        Some("tracefs"),
        target,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    );
    let events = Path::new(target).join("events");
    if mounted.is_ok() && events.join("sched").is_dir() {
        return Ok(events);
    }
    bail!("tracefs is not mounted and mounting it failed: run `mount -t tracefs tracefs {target}`")
}

/// The tracepoint fields the probes read at fixed offsets: (category, event, field, offset).
/// Must match tracer-ebpf/src/probes.
pub const TRACEPOINT_FIELDS: &[(&str, &str, &str, usize)] = &[
    ("sched", "sched_process_fork", "child_pid", 20),
    ("sched", "sched_process_exec", "filename", 8),
    ("sched", "sched_process_exec", "old_pid", 16),
    ("sched", "sched_process_exit", "group_dead", 32),
    ("syscalls", "sys_enter_clone", "clone_flags", 16),
    ("syscalls", "sys_enter_clone3", "uargs", 16),
    ("syscalls", "sys_enter_execve", "filename", 16),
    ("syscalls", "sys_enter_execveat", "filename", 24),
    ("syscalls", "sys_exit_execve", "ret", 16),
    ("syscalls", "sys_exit_execveat", "ret", 16),
    ("syscalls", "sys_enter_open", "filename", 16),
    ("syscalls", "sys_enter_open", "flags", 24),
    ("syscalls", "sys_enter_openat", "filename", 24),
    ("syscalls", "sys_enter_openat", "flags", 32),
    ("syscalls", "sys_enter_openat2", "filename", 24),
    ("syscalls", "sys_enter_openat2", "how", 32),
    ("syscalls", "sys_enter_creat", "pathname", 16),
    ("syscalls", "sys_exit_open", "ret", 16),
    ("syscalls", "sys_exit_openat", "ret", 16),
    ("syscalls", "sys_exit_openat2", "ret", 16),
    ("syscalls", "sys_exit_creat", "ret", 16),
];

/// Verifies [`TRACEPOINT_FIELDS`] against this kernel's tracepoint formats.
pub fn tracepoint_layouts(events: &Path) -> Result<()> {
    for &(cat, ev, field, want) in TRACEPOINT_FIELDS {
        let path = events.join(cat).join(ev).join("format");
        let Ok(text) = std::fs::read_to_string(&path) else {
            bail!(
                "this kernel has no tracepoint {cat}:{ev} ({} unreadable)",
                path.display()
            );
        };
        match field_offset(&text, field) {
            Some(got) if got == want => {}
            Some(got) => bail!(
                "tracepoint {cat}:{ev} has field {field} at offset {got}, spawntrace expects {want}: unsupported kernel"
            ),
            None => bail!("tracepoint {cat}:{ev} has no field {field}: unsupported kernel"),
        }
    }
    Ok(())
}

/// Offset of `field` in a tracefs `format` file.
fn field_offset(format: &str, field: &str) -> Option<usize> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let name = decl.rsplit([' ', '*']).next()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        rest.trim()
            .strip_prefix("offset:")?
            .split(';')
            .next()?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_format_fields() {
        let f = "format:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
                 \tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;\n\
                 \tfield:const char *const * argv;\toffset:24;\tsize:8;\tsigned:0;\n\
                 \tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n";
        assert_eq!(field_offset(f, "filename"), Some(8));
        assert_eq!(field_offset(f, "argv"), Some(24));
        assert_eq!(field_offset(f, "comm"), Some(8));
        assert_eq!(field_offset(f, "nope"), None);
    }
}
