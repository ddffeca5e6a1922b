//! Kernel struct offsets for the probes, looked up in the running kernel's BTF
//! (/sys/kernel/btf/vmlinux). Rust eBPF has no CO-RE relocations, so this is done once at load.
use anyhow::{Context as _, Result, bail};
use btf_rs::{Btf, BtfType, Type};
use tracer_common::KernelOffsets;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Offsets of every field the probes read, looked up once per process (the kernel does not
/// change under us; `compare` records many times). A field that cannot be found is an error:
/// running with a wrong offset would record garbage.
pub fn kernel_offsets() -> Result<KernelOffsets> {
    static CACHE: std::sync::OnceLock<KernelOffsets> = std::sync::OnceLock::new();
    if let Some(o) = CACHE.get() {
        return Ok(*o);
    }
    let o = lookup()?;
    Ok(*CACHE.get_or_init(|| o))
}

fn lookup() -> Result<KernelOffsets> {
    let start = std::time::Instant::now();
    let btf = Btf::from_file(VMLINUX).with_context(|| format!("reading kernel BTF {VMLINUX}"))?;
    let task = find_struct(&btf, "task_struct")?;
    let mm = find_struct(&btf, "mm_struct")?;
    let sched_entity = find_struct(&btf, "sched_entity")?;
    let bprm = find_struct(&btf, "linux_binprm")?;
    let regs = find_struct(&btf, "pt_regs")?;
    let reg = |name: &str| member_offset(&btf, &regs, name);
    log::debug!("kernel BTF read in {:?}", start.elapsed());
    Ok(KernelOffsets {
        task_pid: member_offset(&btf, &task, "pid")?,
        task_tgid: member_offset(&btf, &task, "tgid")?,
        task_mm: member_offset(&btf, &task, "mm")?,
        task_exit_code: member_offset(&btf, &task, "exit_code")?,
        task_sum_exec_runtime: member_offset(&btf, &task, "se")?
            + member_offset(&btf, &sched_entity, "sum_exec_runtime")?,
        mm_arg_start: member_offset(&btf, &mm, "arg_start")?,
        mm_arg_end: member_offset(&btf, &mm, "arg_end")?,
        bprm_filename: member_offset(&btf, &bprm, "filename")?,
        // x86_64 syscall argument registers, in order.
        regs_arg: [reg("di")?, reg("si")?, reg("dx")?, reg("r10")?],
    })
}

fn find_struct(btf: &Btf, name: &str) -> Result<btf_rs::Struct> {
    for ty in btf.resolve_types_by_name(name).with_context(|| format!("BTF has no {name}"))? {
        if let Type::Struct(s) = ty
            && !s.members.is_empty()
        {
            return Ok(s);
        }
    }
    bail!("BTF has no struct {name}")
}

/// Byte offset of `field` in `s`, looking through anonymous struct/union members.
fn member_offset(btf: &Btf, s: &btf_rs::Struct, field: &str) -> Result<u32> {
    find_member(btf, s, field, 0)?
        .with_context(|| format!("kernel BTF: no member {field} in the struct that should hold it"))
}

fn find_member(btf: &Btf, s: &btf_rs::Struct, field: &str, depth: u32) -> Result<Option<u32>> {
    if depth > 8 {
        return Ok(None);
    }
    for m in &s.members {
        let name = match m.get_name_offset() {
            Some(off) if off != 0 => btf.resolve_name(m)?,
            _ => String::new(),
        };
        if name == field {
            if m.bit_offset() % 8 != 0 {
                bail!("kernel BTF: {field} is a bitfield");
            }
            return Ok(Some(m.bit_offset() / 8));
        }
        if name.is_empty()
            && let Type::Struct(inner) | Type::Union(inner) = btf.resolve_chained_type(m)?
            && let Some(off) = find_member(btf, &inner, field, depth + 1)?
        {
            return Ok(Some(m.bit_offset() / 8 + off));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads this machine's BTF (world-readable, no root needed); skipped where there is none.
    #[test]
    fn offsets_from_running_kernel() {
        if !std::path::Path::new(VMLINUX).exists() {
            eprintln!("skipped: {VMLINUX} missing (kernel without BTF)");
            return;
        }
        let off = kernel_offsets().unwrap();
        assert!(off.task_mm > 0 && off.task_exit_code > 0 && off.task_sum_exec_runtime > 0);
        assert_eq!(off.mm_arg_end, off.mm_arg_start + 8, "arg_end follows arg_start");
    }
}
