//! The plugin message schema, Rust side: every datagram the bundled Python plugins send on the
//! attribution channel, typed (documented in tracer/python/PROTOCOL.md). The Python side builds
//! each message in one place too (`spawntrace_agent/messages.py`): a field changed here changes
//! there.
use serde::{Deserialize, Deserializer, Serialize};

/// The protocol version the plugins send in `v`.
pub const PROTOCOL_VERSION: u32 = 1;

/// One message as a plugin sent it: the fields every message has, and its event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Protocol version ([`PROTOCOL_VERSION`]).
    pub v: u32,
    /// When the event happened: `CLOCK_MONOTONIC` ns, the probes' clock.
    pub ts: u64,
    /// The sender's pid by its own word (`os.getpid()`); the kernel's is
    /// [`Received::sender_pid`].
    pub pid: u32,
    /// Messages this pid failed to send so far; never decreases within a pid.
    #[serde(default)]
    pub dropped: u64,
    /// Exceptions this pid's plugin code swallowed so far (a bug report, normally 0).
    #[serde(default)]
    pub errors: u64,
    #[serde(flatten)]
    pub event: PluginEvent,
}

/// What happened, by the `ev` field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum PluginEvent {
    /// Once per playbook file, from the controller. `playbook` is null for ad hoc commands.
    PlaybookStart {
        playbook: Option<String>,
        #[serde(default)]
        ansible_version: Option<String>,
        #[serde(default)]
        python: Option<String>,
        #[serde(default)]
        python_executable: Option<String>,
    },
    PlayStart {
        uuid: String,
        #[serde(default, deserialize_with = "null_as_empty")]
        name: String,
        #[serde(default)]
        strategy: Option<String>,
    },
    /// Once per task uuid, before its workers are forked.
    TaskStart {
        uuid: String,
        #[serde(default, deserialize_with = "null_as_empty")]
        name: String,
        #[serde(default, deserialize_with = "null_as_empty")]
        action: String,
        #[serde(default)]
        role: Option<String>,
        #[serde(default)]
        play_uuid: Option<String>,
        #[serde(default)]
        handler: bool,
        /// The task has `loop` / `with_*`.
        #[serde(rename = "loop", default)]
        is_loop: bool,
        /// `file:line`.
        #[serde(default)]
        path: Option<String>,
    },
    /// From inside a WorkerProcess, right after its fork: every process below the sender
    /// belongs to this host and task.
    WorkerStart {
        host: String,
        task_uuid: String,
        #[serde(default)]
        worker_id: Option<u32>,
        /// The controller's pid.
        #[serde(default)]
        ppid: Option<u32>,
    },
    /// A loop item begins in the sending worker; processes it starts until the matching
    /// `item_end` belong to the item.
    ItemStart {
        host: String,
        task_uuid: String,
        index: u32,
        #[serde(default)]
        label: Option<String>,
    },
    ItemEnd {
        host: String,
        task_uuid: String,
        index: u32,
        /// None when running the item raised.
        #[serde(default)]
        status: Option<TaskStatus>,
    },
    /// A worker's result reached the controller.
    RunnerEnd {
        host: String,
        task_uuid: String,
        status: TaskStatus,
        #[serde(default)]
        ignore_errors: Option<bool>,
    },
    /// From the controller, after the last playbook.
    PlaybookEnd {},
    /// A persistent agent is up, sent by the agent itself: it and its runners belong to no
    /// task unless a `runner_start` says so.
    AgentStart {
        #[serde(default)]
        host: Option<String>,
        #[serde(default)]
        user: Option<String>,
        #[serde(default)]
        become_user: Option<String>,
        /// The agent's version (its payload's hash).
        #[serde(default)]
        version: Option<String>,
    },
    /// A persistent agent handed a module run to `runner_pid`: that process (and what it
    /// starts until the next `runner_start` naming it) works for this worker or host and task.
    /// Sent by the agent, or by the connection plugin in the worker when the agent could not
    /// (`remote`: the runner lives on another machine and is not in this trace).
    RunnerStart {
        /// None in traces written before this field existed (the runner was then in `pid`):
        /// see [`Received::runner_pid`].
        #[serde(default)]
        runner_pid: Option<u32>,
        #[serde(default)]
        agent_pid: Option<u32>,
        #[serde(default)]
        worker_pid: Option<u32>,
        #[serde(default)]
        host: Option<String>,
        #[serde(default)]
        task_uuid: Option<String>,
        /// The loop item's index.
        #[serde(default)]
        item: Option<u32>,
        #[serde(default)]
        module: Option<String>,
        #[serde(default)]
        remote: bool,
    },
    /// An event this version does not know (a trace written by a newer spawntrace): ignored.
    #[serde(other)]
    Other,
}

/// Names Ansible may leave empty: a null is an empty name, not a malformed message.
fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// How a task (or a loop item) ended on a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Ok,
    Changed,
    Failed,
    Skipped,
    Unreachable,
}

impl TaskStatus {
    pub fn name(self) -> &'static str {
        match self {
            TaskStatus::Ok => "ok",
            TaskStatus::Changed => "changed",
            TaskStatus::Failed => "failed",
            TaskStatus::Skipped => "skipped",
            TaskStatus::Unreachable => "unreachable",
        }
    }
}

/// A message as the tracer received it, as stored in the trace
/// (`{"type":"ansible","sender_pid":…, …message}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Received {
    /// The sender's pid as vouched for by the kernel (`SCM_CREDENTIALS`); 0 if none came.
    pub sender_pid: u32,
    #[serde(flatten)]
    pub message: Message,
}

impl Received {
    /// The sender: the kernel's word, else the message's own.
    pub fn pid(&self) -> u32 {
        if self.sender_pid != 0 { self.sender_pid } else { self.message.pid }
    }

    pub fn ts(&self) -> u64 {
        self.message.ts
    }

    pub fn event(&self) -> &PluginEvent {
        &self.message.event
    }

    /// The runner a `runner_start` names (older agents named it in `pid`).
    pub fn runner_pid(&self) -> Option<u32> {
        match self.message.event {
            PluginEvent::RunnerStart { runner_pid, .. } => Some(runner_pid.unwrap_or(self.message.pid)),
            _ => None,
        }
    }
}

/// Why a datagram is not a message of this protocol.
#[derive(Debug, thiserror::Error)]
pub enum Malformed {
    #[error("not a JSON object of the attribution protocol: {0}")]
    Schema(#[from] serde_json::Error),
    #[error("unknown event")]
    UnknownEvent,
    #[error("protocol version {0}, not {PROTOCOL_VERSION}")]
    Version(u32),
}

/// Decodes one datagram. Unknown events are malformed here (the plugins are this build's own);
/// in a saved trace they are kept as [`PluginEvent::Other`].
pub fn decode(datagram: &[u8]) -> Result<Message, Malformed> {
    let message: Message = serde_json::from_slice(datagram)?;
    match message.event {
        _ if message.v != PROTOCOL_VERSION => Err(Malformed::Version(message.v)),
        PluginEvent::Other => Err(Malformed::UnknownEvent),
        _ => Ok(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_of_the_protocol_decodes() {
        let common = r#""v":1,"ts":5,"pid":7,"dropped":2,"errors":0"#;
        for (body, want) in [
            (r#""ev":"playbook_start","playbook":null,"python":"3.11.7""#, "PlaybookStart"),
            (r#""ev":"play_start","uuid":"p","name":"n","strategy":"linear""#, "PlayStart"),
            (r#""ev":"play_start","uuid":"p","name":null"#, "PlayStart"),
            (
                r#""ev":"task_start","uuid":"t","name":"n","action":"copy","role":null,"play_uuid":"p","handler":false,"loop":true,"path":"x.yml:3""#,
                "TaskStart",
            ),
            (r#""ev":"worker_start","host":"h","task_uuid":"t","worker_id":0,"ppid":3"#, "WorkerStart"),
            (r#""ev":"item_start","host":"h","task_uuid":"t","index":0,"label":"a""#, "ItemStart"),
            (r#""ev":"item_end","host":"h","task_uuid":"t","index":0,"status":null"#, "ItemEnd"),
            (
                r#""ev":"runner_end","host":"h","task_uuid":"t","status":"failed","ignore_errors":true"#,
                "RunnerEnd",
            ),
            (r#""ev":"playbook_end""#, "PlaybookEnd"),
            (r#""ev":"agent_start","host":"h","user":"u","become_user":null,"version":"abc""#, "AgentStart"),
            (
                r#""ev":"runner_start","runner_pid":9,"agent_pid":8,"worker_pid":7,"host":"h","task_uuid":"t","item":1,"module":"copy""#,
                "RunnerStart",
            ),
        ] {
            let m =
                decode(format!("{{{common},{body}}}").as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"));
            assert!(format!("{:?}", m.event).starts_with(want), "{body}: {m:?}");
            assert_eq!((m.ts, m.pid, m.dropped), (5, 7, 2));
        }
    }

    #[test]
    fn datagrams_outside_the_protocol_are_malformed() {
        for bad in [
            &b"not json"[..],
            br#"[1,2]"#,
            br#"{"v":1,"ts":5,"pid":7}"#,
            br#"{"v":1,"ts":5,"pid":7,"ev":"task_start"}"#,
            br#"{"v":1,"ts":5,"pid":7,"ev":"runner_end","host":"h","task_uuid":"t","status":"fine"}"#,
            br#"{"v":1,"ts":-5,"pid":7,"ev":"playbook_end"}"#,
            br#"{"v":1,"ts":5,"pid":7,"ev":"a_new_event"}"#,
            br#"{"v":2,"ts":5,"pid":7,"ev":"playbook_end"}"#,
        ] {
            assert!(decode(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_trace_keeps_the_kernel_pid_and_reads_unknown_events_as_other() {
        let line = r#"{"sender_pid":4,"v":1,"ts":5,"pid":7,"ev":"item_end","host":"h","task_uuid":"t","index":2,"status":"ok"}"#;
        let r: Received = serde_json::from_str(line).unwrap();
        assert_eq!((r.sender_pid, r.pid()), (4, 4));
        assert_eq!(serde_json::from_str::<Received>(&serde_json::to_string(&r).unwrap()).unwrap(), r);
        let newer: Received =
            serde_json::from_str(r#"{"sender_pid":4,"v":1,"ts":5,"pid":7,"ev":"a_new_event","x":1}"#)
                .unwrap();
        assert_eq!(newer.message.event, PluginEvent::Other);
    }
}
