//! Loading and attaching the eBPF probes, and reading their health counters.
use std::os::fd::OwnedFd;

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{RawTracePoint, raw_trace_point::RawTracePointLink},
};
use tracer_common::{KernelOffsets, counter};

use crate::trace::Counters;

/// The probe programs; each is named after the raw tracepoint it attaches to.
const PROGRAMS: &[&str] =
    &["sched_process_fork", "sched_process_exec", "sched_process_exit", "sys_enter", "sys_exit"];

/// Loaded, attached probes. Dropping this detaches them.
pub struct Probes {
    /// Owned here (not by `ebpf`) so that dropping can detach them in parallel.
    links: Vec<RawTracePointLink>,
    ebpf: Ebpf,
    /// Keeps kernel BPF run-time statistics on while we run.
    _stats: Option<OwnedFd>,
}

impl Probes {
    /// Loads the embedded object with the tracer's tgid and the kernel offsets, attaches every
    /// tracepoint. `ring_bytes` must be a power-of-two multiple of the page size.
    /// With `stats`, the kernel times every probe run (two clock reads each) so that
    /// [`Probes::cpu_ns`] can report the probes' own CPU time.
    pub fn load(tracer_tgid: u32, offsets: KernelOffsets, ring_bytes: u32, stats: bool) -> Result<Self> {
        // Older kernels charge BPF memory to RLIMIT_MEMLOCK; 6.x uses memcg. Best effort only.
        let _ = nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_MEMLOCK,
            nix::sys::resource::RLIM_INFINITY,
            nix::sys::resource::RLIM_INFINITY,
        );
        let start = std::time::Instant::now();
        let stats = stats.then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime).ok()).flatten();
        let mut ebpf = EbpfLoader::new()
            .override_global("TRACER_TGID", &tracer_tgid, true)
            .override_global("OFFSETS", &offsets, true)
            .map_max_entries("EVENTS", ring_bytes)
            .load(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf")))
            .context("loading the eBPF probes")?;
        let mut links = Vec::with_capacity(PROGRAMS.len());
        for &name in PROGRAMS {
            let prog: &mut RawTracePoint = ebpf
                .program_mut(name)
                .with_context(|| format!("probe {name} missing from the eBPF object"))?
                .try_into()
                .with_context(|| format!("probe {name} is not a raw tracepoint"))?;
            prog.load().with_context(|| format!("verifier rejected probe {name}"))?;
            let id = prog
                .attach(name)
                .with_context(|| format!("attaching probe {name} to raw tracepoint {name}"))?;
            links.push(prog.take_link(id)?);
        }
        log::debug!("probes loaded and attached in {:?}", start.elapsed());
        let mut probes = Self { links, ebpf, _stats: stats };
        probes.allow_roots(1)?;
        Ok(probes)
    }

    /// Starts forwarding kernel-side aya-log messages to the `log` crate.
    pub fn logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::debug!("no eBPF logger: {e}");
                None
            }
        }
    }

    /// How many of the tracer's next forks are the roots of traced trees (the command); later
    /// ones are the tracer's own.
    fn allow_roots(&mut self, n: u32) -> Result<()> {
        let map = self.ebpf.map_mut("ROOTS_LEFT").context("ROOTS_LEFT map missing")?;
        aya::maps::Array::<_, u32>::try_from(map)?.set(0, n, 0).context("setting ROOTS_LEFT")
    }

    /// Adds a running process to the traced set: its events, and its descendants from now on,
    /// are recorded (a target recorder's sshd session).
    pub fn track(&mut self, tgid: u32) -> Result<()> {
        let map = self.ebpf.map_mut("TRACKED").context("TRACKED map missing")?;
        let mut tracked = aya::maps::HashMap::<_, u32, u8>::try_from(map)?;
        tracked.insert(tgid, 1, 0).with_context(|| format!("tracking process {tgid}"))
    }

    /// The event ring buffer (can be taken once).
    pub fn events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map("EVENTS").context("EVENTS map missing or already taken")?;
        RingBuf::try_from(map).context("EVENTS is not a ring buffer")
    }

    /// Kernel-side counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let map = self.ebpf.map("COUNTERS").context("COUNTERS map missing")?;
        let arr = PerCpuArray::<_, u64>::try_from(map)?;
        let sum = |i: u32| -> Result<u64> { Ok(arr.get(&i, 0)?.iter().sum()) };
        Ok(Counters {
            ringbuf_drops: sum(counter::RINGBUF_DROPS)?,
            read_failures: sum(counter::READ_FAILURES)?,
            track_failures: sum(counter::TRACK_FAILURES)?,
            stash_failures: sum(counter::STASH_FAILURES)?,
            decode_failures: 0,
        })
    }

    /// CPU time spent inside the probes (all processes, since load), when stats are enabled.
    pub fn cpu_ns(&self) -> Option<u64> {
        self._stats.as_ref()?;
        let mut total = 0u64;
        for (name, prog) in self.ebpf.programs() {
            let Ok(tp) = <&RawTracePoint>::try_from(prog) else {
                continue;
            };
            let info = tp.info().ok()?;
            log::debug!("probe {name}: {} runs, {:?}", info.run_count(), info.run_time());
            total += info.run_time().as_nanos() as u64;
        }
        Some(total)
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        let start = std::time::Instant::now();
        self.links.clear();
        log::debug!("probes detached in {:?}", start.elapsed());
    }
}
