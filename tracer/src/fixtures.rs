//! Kernel events and plugin messages for unit tests: one set of constructors for every room's
//! tests. Times are raw ns; [`ms`] places them on a millisecond grid.
use crate::{
    ansible::messages::Received,
    trace::{Event, FORMAT, Header, Status, VERSION},
};

/// Where [`ms`] starts counting.
pub const BASE: u64 = 1_000_000_000;

/// `BASE` plus `ms` milliseconds.
pub fn ms(ms: f64) -> u64 {
    BASE + (ms * 1e6) as u64
}

/// A traced command's root process (forked by the tracer).
pub fn root(ts: u64, tgid: u32) -> Event {
    Event::Fork { ts, pid: tgid, tgid, ppid: 1, ptgid: 1, thread: false, root: true }
}

/// A new process `tgid` of `ptgid`.
pub fn fork(ts: u64, tgid: u32, ptgid: u32) -> Event {
    Event::Fork { ts, pid: tgid, tgid, ppid: ptgid, ptgid, thread: false, root: false }
}

/// A new thread `tid` of process `tgid`.
pub fn thread(ts: u64, tid: u32, tgid: u32) -> Event {
    Event::Fork { ts, pid: tid, tgid, ppid: tgid, ptgid: tgid, thread: true, root: false }
}

/// `tgid` execs `argv[0]` with `argv`.
pub fn exec(ts: u64, tgid: u32, argv: &[&str]) -> Event {
    Event::Exec {
        ts,
        pid: tgid,
        tgid,
        old_pid: tgid,
        filename: argv[0].into(),
        argv: argv.iter().map(|a| a.to_string()).collect(),
        argv_bytes: argv.iter().map(|a| a.len() as u32 + 1).sum(),
        argv_truncated: false,
        argv_unreadable: false,
        filename_truncated: false,
    }
}

/// A failed exec of `filename` (ENOENT).
pub fn exec_failed(ts: u64, tgid: u32, filename: &str) -> Event {
    Event::ExecFailed {
        ts,
        pid: tgid,
        tgid,
        syscall: "execve".into(),
        errno: 2,
        error: "ENOENT".into(),
        filename: filename.into(),
        filename_truncated: false,
    }
}

/// Process `tgid` ends with status 0 after 2 ms of CPU.
pub fn exit(ts: u64, tgid: u32) -> Event {
    exit_of(ts, tgid, tgid, true, Status::Exited(0), Some(2_000_000))
}

/// Thread `tid` of `tgid` ends (the whole process with `group_dead`) after `cpu_ns` of CPU.
pub fn exit_of(ts: u64, tgid: u32, tid: u32, group_dead: bool, status: Status, cpu_ns: Option<u64>) -> Event {
    Event::Exit { ts, pid: tid, tgid, group_dead, status, cpu_ns }
}

/// `tgid` opens `path` (fd 3).
pub fn open(ts: u64, tgid: u32, path: &str) -> Event {
    Event::Open {
        ts,
        pid: tgid,
        tgid,
        syscall: "openat".into(),
        path: path.into(),
        flags: 0,
        ret: 3,
        path_truncated: false,
    }
}

/// A plugin message from `pid` (by the kernel's word and its own) at `ts`: `fields` are the
/// event's (`{"ev": "task_start", …}`). Panics when they are not a message of the protocol.
pub fn msg(pid: u32, ts: u64, fields: serde_json::Value) -> Received {
    let mut line = serde_json::json!({"sender_pid": pid, "v": 1, "ts": ts, "pid": pid});
    line.as_object_mut().unwrap().extend(fields.as_object().expect("an object").clone());
    serde_json::from_value(line.clone()).unwrap_or_else(|e| panic!("{line}: {e}"))
}

/// The header of a trace of `command` that started at [`BASE`].
pub fn header(command: &[&str]) -> Header {
    Header {
        format: FORMAT.into(),
        version: VERSION,
        minor_version: crate::trace::MINOR_VERSION,
        tool_version: "0".into(),
        kernel: "k".into(),
        hostname: "h".into(),
        clock: "CLOCK_MONOTONIC".into(),
        realtime_offset_ns: 0,
        boot_time_s: 0,
        command: command.iter().map(|a| a.to_string()).collect(),
        root_pid: 10,
        uid: 0,
        gid: 0,
        start_ns: BASE,
        argv_cap: 4096,
        path_cap: 256,
        callback_injected: false,
    }
}
