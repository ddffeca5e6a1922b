//! One analysed run: what the trace says about itself (header, footer), the process model
//! rebuilt from its events, the Ansible attribution, and what the run did on its SSH targets.
//! It is built once — from a finished recording or from a saved trace — and every output
//! (report, histograms, wall-time categories, flamegraph, timeline, compare, check) reads it.
use std::path::Path;

use anyhow::Result;

use crate::{
    ansible::{
        attribution::Attribution,
        messages::Received,
        processes,
        target_attribution::{self, Target},
    },
    model::Model,
    record::launch::RunAs,
    trace::{Event, Footer, Header, TargetRecord, Trace},
};

pub struct Analysis {
    pub header: Header,
    /// None when the trace is incomplete (the tracer was killed): what it lost is unknown.
    pub footer: Option<Footer>,
    pub model: Model,
    /// Who each process worked for; None when no plugin message arrived.
    pub attribution: Option<Attribution>,
    /// Plugin messages the trace held that are not messages of the protocol (older traces).
    pub skipped_plugin_messages: u64,
    /// The SSH targets the run reached, each with its own processes (attributed when the
    /// controller's are).
    pub targets: Vec<Target>,
}

impl Analysis {
    /// An empty process model that notes what an analysis of Ansible runs needs (each
    /// process's first open of a module payload). Recordings build theirs with it.
    pub fn new_model() -> Model {
        Model::marking_opens(processes::is_module_payload)
    }

    /// The analysis of a model built with [`Analysis::new_model`], the plugins' messages and
    /// the records of the SSH targets.
    pub fn new(
        header: Header,
        footer: Option<Footer>,
        model: Model,
        messages: &[Received],
        target_records: &[TargetRecord],
    ) -> Self {
        let attribution = (!messages.is_empty()).then(|| Attribution::new(&model, messages));
        let mut targets = target_attribution::targets(target_records);
        if let Some(a) = &attribution {
            for t in &mut targets {
                target_attribution::attribute(t, &model, a);
            }
        }
        Self { header, footer, model, attribution, skipped_plugin_messages: 0, targets }
    }

    /// From events in memory (tests, tools).
    pub fn from_events<'a>(
        header: Header,
        footer: Option<Footer>,
        events: impl IntoIterator<Item = &'a Event>,
        messages: &[Received],
    ) -> Self {
        let mut model = Self::new_model();
        for e in events {
            model.apply(e);
        }
        Self::new(header, footer, model, messages, &[])
    }

    /// Reads a saved trace straight into its model: the events are not kept, so memory is what
    /// the model needs, not the file's size. The file is opened as `owner` (under sudo, the
    /// user: see [`crate::output::open_read`]).
    pub fn read(path: &Path, owner: Option<&RunAs>) -> Result<Self> {
        let file = crate::output::open_read(path, owner)?;
        let mut model = Self::new_model();
        let trace = Trace::read_file(file, path, |e| model.apply(&e))?;
        let Trace { header, footer, plugin_messages, skipped_plugin_messages, targets, .. } = trace;
        Ok(Self { skipped_plugin_messages, ..Self::new(header, footer, model, &plugin_messages, &targets) })
    }

    /// Whether the trace ends with its footer.
    pub fn complete(&self) -> bool {
        self.footer.is_some()
    }

    /// Whether this was an Ansible run: its tables are shown even when no message arrived, so a
    /// broken channel is reported rather than hidden.
    pub fn ansible_run(&self) -> bool {
        self.header.callback_injected || self.attribution.is_some()
    }

    /// When the run ended: the footer's end, else (incomplete) the last event's time; never
    /// before the start.
    pub fn end_ns(&self) -> u64 {
        self.footer.as_ref().map_or(self.model.totals.last_ns, |f| f.end_ns).max(self.header.start_ns)
    }

    pub fn wall_s(&self) -> f64 {
        (self.end_ns() - self.header.start_ns) as f64 / 1e9
    }

    /// Events lost, None when unknown (an incomplete trace).
    pub fn dropped_events(&self) -> Option<u64> {
        self.footer.as_ref().map(|f| f.counters.dropped_events())
    }

    /// Datagrams and trace lines that were not messages of the protocol.
    pub fn malformed_messages(&self) -> u64 {
        self.footer.as_ref().map_or(0, |f| f.malformed_messages) + self.skipped_plugin_messages
    }

    /// Processes given to no task or category (all of them without attribution).
    pub fn unattributed(&self) -> u64 {
        self.attribution.as_ref().map_or(self.model.processes.len() as u64, Attribution::unattributed)
    }

    /// What kind of work process `i` does (module, shell helper, ssh, other).
    pub fn kind(&self, i: usize) -> processes::Kind {
        processes::kind(&self.model, i)
    }
}

#[cfg(test)]
pub(crate) mod fixture {
    //! A synthetic Ansible run shared by the outputs' tests; times in ms after
    //! [`fixtures::BASE`].
    //!
    //! ```text
    //! 0    ansible-playbook (root, never exits); 2-4 ldconfig (controller)
    //! 10-60 worker A, host h1, task "copy stuff" (copy), no loop:
    //!   12-40 sh (exec 13) > 15-35 python3 AnsiballZ_copy (exec 16, payload open 20)
    //!                           > 25-30 make (exec 26, a failed exec at 25.5)
    //!   42-50 ssh;  45-55 sh > 52-54 rm;  56-58 make
    //! 70-90 worker B, host h2, task "ping" (ping), items [0] 71-80, [1] 80-89:
    //!   72-  agent (never exits) > 75-80 runner for B > 76-79 python3 AnsiballZ_ping (open 78)
    //! footer end 100
    //! ```
    use serde_json::json;

    use super::Analysis;
    use crate::{
        ansible::messages::Received,
        fixtures::{self, exec, exec_failed, exit, fork, ms, msg, open, root},
        trace::{Counters, Event, Footer, Header, Status},
    };

    pub fn header() -> Header {
        Header { callback_injected: true, ..fixtures::header(&["ansible-playbook", "site.yml"]) }
    }

    pub fn footer() -> Footer {
        Footer {
            end_ns: ms(100.0),
            status: Status::Exited(0),
            events: 0,
            counters: Counters::default(),
            tracer_cpu_ns: 0,
            probe_cpu_ns: None,
            interrupted: false,
            malformed_messages: 0,
        }
    }

    pub fn events() -> Vec<Event> {
        vec![
            root(ms(0.0), 10),
            exec(ms(0.0), 10, &["/venv/bin/python", "/venv/bin/ansible-playbook", "site.yml"]),
            fork(ms(2.0), 15, 10),
            exec(ms(2.0), 15, &["/sbin/ldconfig"]),
            exit(ms(4.0), 15),
            fork(ms(10.0), 20, 10),
            fork(ms(12.0), 21, 20),
            exec(
                ms(13.0),
                21,
                &["/bin/sh", "-c", "/usr/bin/python3 /tmp/ansible-tmp-1/AnsiballZ_copy.py && sleep 0"],
            ),
            fork(ms(15.0), 22, 21),
            exec(ms(16.0), 22, &["/usr/bin/python3", "/tmp/ansible-tmp-1/AnsiballZ_copy.py"]),
            open(ms(20.0), 22, "/tmp/ansible_copy_payload_x/ansible_copy_payload.zip"),
            fork(ms(25.0), 23, 22),
            exec_failed(ms(25.5), 23, "/usr/local/bin/make"),
            exec(ms(26.0), 23, &["/usr/bin/make"]),
            exit(ms(30.0), 23),
            exit(ms(35.0), 22),
            exit(ms(40.0), 21),
            fork(ms(42.0), 24, 20),
            exec(ms(42.0), 24, &["/usr/bin/ssh", "h1"]),
            fork(ms(45.0), 25, 20),
            exec(ms(45.0), 25, &["/bin/sh", "-c", "rm -f -r /tmp/x"]),
            exit(ms(50.0), 24),
            fork(ms(52.0), 27, 25),
            exec(ms(52.0), 27, &["/bin/rm", "-f", "-r", "/tmp/x"]),
            exit(ms(54.0), 27),
            exit(ms(55.0), 25),
            fork(ms(56.0), 26, 20),
            exec(ms(56.0), 26, &["/usr/bin/make"]),
            exit(ms(58.0), 26),
            exit(ms(60.0), 20),
            fork(ms(70.0), 30, 10),
            fork(ms(72.0), 40, 30),
            fork(ms(75.0), 41, 40),
            fork(ms(76.0), 42, 41),
            exec(ms(76.0), 42, &["/usr/bin/python3", "/tmp/ansible-tmp-2/AnsiballZ_ping.py"]),
            open(ms(78.0), 42, "/tmp/ansible_ping_payload_y/ansible_ping_payload.zip"),
            exit(ms(79.0), 42),
            exit(ms(80.0), 41),
            exit(ms(90.0), 30),
        ]
    }

    pub fn messages() -> Vec<Received> {
        let item = |ev: &str, index: u32, extra: serde_json::Value| {
            let mut fields = json!({"ev": ev, "host": "h2", "task_uuid": "t2", "index": index});
            fields.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            fields
        };
        vec![
            msg(10, ms(1.0), json!({"ev": "playbook_start", "playbook": "/site.yml"})),
            msg(10, ms(1.0), json!({"ev": "play_start", "uuid": "p", "name": "Play"})),
            msg(
                10,
                ms(5.0),
                json!({"ev": "task_start", "uuid": "t1", "name": "copy stuff", "action": "copy", "play_uuid": "p"}),
            ),
            msg(20, ms(10.0), json!({"ev": "worker_start", "host": "h1", "task_uuid": "t1"})),
            msg(
                10,
                ms(65.0),
                json!({"ev": "task_start", "uuid": "t2", "name": "ping", "action": "ping", "play_uuid": "p", "loop": true}),
            ),
            msg(30, ms(70.0), json!({"ev": "worker_start", "host": "h2", "task_uuid": "t2"})),
            msg(30, ms(71.0), item("item_start", 0, json!({"label": "a"}))),
            msg(40, ms(72.0), json!({"ev": "agent_start"})),
            msg(40, ms(75.0), json!({"ev": "runner_start", "runner_pid": 41, "worker_pid": 30, "item": 0})),
            msg(30, ms(80.0), item("item_end", 0, json!({}))),
            msg(30, ms(80.0), item("item_start", 1, json!({"label": "b"}))),
            msg(30, ms(89.0), item("item_end", 1, json!({}))),
        ]
    }

    /// The run above, complete.
    pub fn analysis() -> Analysis {
        Analysis::from_events(header(), Some(footer()), &events(), &messages())
    }

    /// The run above without its footer (the tracer was killed).
    pub fn incomplete() -> Analysis {
        Analysis::from_events(header(), None, &events(), &messages())
    }

    /// The run above as if no plugin message had arrived.
    pub fn unattributed() -> Analysis {
        Analysis::from_events(header(), Some(footer()), &events(), &[])
    }
}

#[cfg(test)]
mod tests {
    use super::fixture;

    #[test]
    fn no_messages_means_no_attribution() {
        let a = fixture::unattributed();
        assert!(a.attribution.is_none());
        assert!(a.ansible_run(), "the plugins were injected: still an Ansible run");
        assert_eq!(a.unattributed(), a.model.processes.len() as u64);
        let a = fixture::analysis();
        assert_eq!(a.attribution.as_ref().map(|a| a.workers.len()), Some(2));
        assert_eq!(a.model.processes.iter().filter_map(|p| p.first_marked_open_ns).count(), 2);
    }

    #[test]
    fn an_incomplete_run_ends_at_its_last_event() {
        assert_eq!(fixture::analysis().end_ns(), crate::fixtures::ms(100.0));
        assert_eq!(fixture::incomplete().end_ns(), crate::fixtures::ms(90.0));
        assert_eq!(fixture::incomplete().dropped_events(), None);
    }
}
