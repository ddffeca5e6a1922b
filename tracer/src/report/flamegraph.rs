//! Flamegraphs of what a run spawned (drawn by inferno). For Ansible runs the stacks are
//! `playbook;play;task;host;<process chain below the worker>`; for anything else, the process
//! tree from the traced command down.
use std::io::Write;

use anyhow::{Context as _, Result};

use crate::{
    analysis::Analysis,
    ansible::attribution::{Attribution, Owner},
    model::basename,
    report::labels,
};

/// What a frame's width measures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Weight {
    /// Processes spawned.
    #[default]
    Count,
    /// Summed process lifetimes (µs).
    Wall,
    /// CPU time (µs).
    Cpu,
}

impl Weight {
    fn unit(self) -> &'static str {
        match self {
            Weight::Count => "processes",
            Weight::Wall | Weight::Cpu => "µs",
        }
    }

    fn meaning(self) -> &'static str {
        match self {
            Weight::Count => "width = processes spawned",
            Weight::Wall => "width = summed process lifetimes",
            Weight::Cpu => "width = CPU time",
        }
    }
}

/// Where hosts go in Ansible stacks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FlameBy {
    /// `…;task;host;…`
    #[default]
    Task,
    /// `…;host;task;…`
    Host,
}

/// inferno splits frames on `;` and samples on the last space-separated field.
fn frame(s: &str) -> String {
    s.replace(';', ":").replace(['\n', '\r'], " ")
}

/// Folded stacks (`frame;frame;frame N`), merged and sorted.
pub fn folded(analysis: &Analysis, weight: Weight, by: FlameBy) -> Vec<String> {
    let mut stacks: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let mut add = |frames: Vec<String>, w: u64| {
        let key = frames.iter().map(|f| frame(f)).collect::<Vec<_>>().join(";");
        *stacks.entry(key).or_insert(0) += w;
    };
    let (model, attribution) = (&analysis.model, analysis.attribution.as_ref());
    let playbook = attribution
        .and_then(|a| a.playbook.as_deref())
        .map(|p| basename(p).to_owned())
        .unwrap_or_else(|| "playbook".into());
    // `playbook;play;task;host` (or `…;host;task`) of a worker
    let task_frames = |a: &Attribution, worker: usize| {
        let wk = &a.workers[worker];
        let task = &a.tasks[wk.task];
        let play = if task.play.is_empty() { "(play)".into() } else { task.play.clone() };
        let (t, h) = (task.name.clone(), wk.host.clone());
        match by {
            FlameBy::Task => vec![playbook.clone(), play, t, h],
            FlameBy::Host => vec![playbook.clone(), play, h, t],
        }
    };
    for (i, p) in model.processes.iter().enumerate() {
        let w = weight.of(model, p);
        if w == 0 {
            continue;
        }
        let chain = model.ancestry(i);
        let below =
            |from: usize| -> Vec<String> { chain[from..].iter().map(|&c| labels::label(model, c)).collect() };
        let frames = match attribution.map(|a| (a, a.owners[i])) {
            None => below(0),
            Some((a, Owner::Task { worker, .. })) => {
                let mut frames = task_frames(a, worker);
                match chain.iter().position(|&c| c == a.workers[worker].proc) {
                    Some(d) => frames.extend(below(d + 1)),
                    // Work done for this task by a persistent agent's runner.
                    None => frames.extend(["(agent runner)".to_owned(), labels::label(model, i)]),
                }
                frames
            }
            Some((_, owner)) => {
                let mut frames = vec![playbook.clone(), format!("({})", owner.category())];
                frames.extend(below(0));
                frames
            }
        };
        add(frames, w);
    }
    // The targets' processes go on from their task and host's `ssh` frame:
    // `…;task;host;ssh;[target] sh -c …;python3 AnsiballZ_copy`.
    for (target, a) in analysis.targets.iter().filter_map(|t| Some((t, attribution?))) {
        let model = &target.model;
        let session = target.session();
        for (i, p) in model.processes.iter().enumerate() {
            let w = weight.of(model, p);
            if w == 0 {
                continue;
            }
            let mut frames = match target.owners.get(i).copied().unwrap_or(Owner::Unattributed) {
                Owner::Task { worker, .. } => {
                    let mut frames = task_frames(a, worker);
                    frames.push("ssh".into());
                    frames
                }
                owner => vec![playbook.clone(), format!("({})", owner.category())],
            };
            // below the recorded sshd session, the first frame marked as the target's
            let chain = model.ancestry(i).into_iter().filter(|&c| Some(c) != session || c == i);
            for (n, c) in chain.enumerate() {
                let label = labels::target_label(model, c, session);
                frames.push(if n == 0 { format!("[target] {label}") } else { label });
            }
            add(frames, w);
        }
    }
    stacks.into_iter().map(|(k, v)| format!("{k} {v}")).collect()
}

impl Weight {
    /// A process's width: 1, its lifetime (µs; still running: until the model's last event),
    /// or its CPU time (µs).
    fn of(self, model: &crate::model::Model, p: &crate::model::Process) -> u64 {
        match self {
            Weight::Count => 1,
            Weight::Wall => {
                p.wall_ns().unwrap_or_else(|| model.totals.last_ns.saturating_sub(p.start_ns)) / 1000
            }
            Weight::Cpu => p.cpu_ns / 1000,
        }
    }
}

fn options(title: String, subtitle: String, count_name: &str) -> inferno::flamegraph::Options<'static> {
    let mut o = inferno::flamegraph::Options::default();
    o.title = title;
    o.subtitle = Some(subtitle);
    o.count_name = count_name.to_owned();
    o.name_type = "Frame:".into();
    o.deterministic = true;
    o.hash = true;
    o
}

/// Writes an SVG flamegraph of folded stacks of `analysis`.
pub fn svg(analysis: &Analysis, lines: &[String], weight: Weight, out: impl Write) -> Result<()> {
    let title = format!("spawntrace: {}", analysis.header.command.join(" "));
    let mut opts = options(title, weight.meaning().to_owned(), weight.unit());
    inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), out)
        .context("drawing the flamegraph")
}

/// Writes a differential flamegraph in the shape of `before`, coloured by the change to
/// `after` (inferno's diff-folded semantics, drawn negated): blue frames are what `after`
/// removed or shrank, red frames what it grew.
pub fn diff_svg(
    before: &[String],
    after: &[String],
    weight: Weight,
    title: &str,
    out: impl Write,
) -> Result<()> {
    let join = |l: &[String]| l.join("\n").into_bytes();
    let mut diff = Vec::new();
    // Folded with the traces swapped, the graph takes the first trace's shape; negating the hues
    // then shows a drop from first to second in blue.
    inferno::differential::from_readers(
        inferno::differential::Options::default(),
        join(after).as_slice(),
        join(before).as_slice(),
        &mut diff,
    )
    .context("diffing folded stacks")?;
    let diff = String::from_utf8(diff).context("folded stacks are not UTF-8")?;
    let subtitle =
        format!("{} in the first trace; blue: removed or shrunk in the second, red: grown", weight.meaning());
    let mut opts = options(title.to_owned(), subtitle, weight.unit());
    opts.negate_differentials = true;
    inferno::flamegraph::from_lines(&mut opts, diff.lines(), out)
        .context("drawing the differential flamegraph")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::fixtures::{exec, exit_of, fork, header, msg, root};

    #[test]
    fn ansible_stacks_and_weights() {
        let exit = |ts, tgid, cpu| exit_of(ts, tgid, tgid, true, crate::trace::Status::Exited(0), Some(cpu));
        let events = vec![
            root(0, 10),
            exec(1, 10, &["/venv/bin/ansible-playbook", "site.yml"]),
            fork(10_000, 20, 10),
            fork(20_000, 21, 20),
            exec(21_000, 21, &["/bin/sh", "-c", "/bin/sh -c 'echo ~root && sleep 0'"]),
            exit(30_000, 21, 4_000),
            exit(50_000, 20, 9_000),
            exit(90_000, 10, 1_000),
        ];
        let messages = vec![
            msg(10, 2, json!({"ev": "playbook_start", "playbook": "/x/site.yml"})),
            msg(10, 3, json!({"ev": "play_start", "uuid": "p", "name": "Web; servers"})),
            msg(
                10,
                4,
                json!({"ev": "task_start", "uuid": "t", "name": "copy it", "action": "copy", "play_uuid": "p"}),
            ),
            msg(20, 11_000, json!({"ev": "worker_start", "host": "h1", "task_uuid": "t"})),
        ];
        let a = Analysis::from_events(header(&["ansible-playbook"]), None, &events, &messages);
        let count = folded(&a, Weight::Count, FlameBy::Task);
        assert_eq!(
            count,
            vec![
                "site.yml;(controller);ansible-playbook 1",
                "site.yml;Web: servers;copy it;h1 1",
                "site.yml;Web: servers;copy it;h1;sh -c echo ~ 1",
            ]
        );
        let by_host = folded(&a, Weight::Count, FlameBy::Host);
        assert!(by_host.contains(&"site.yml;Web: servers;h1;copy it;sh -c echo ~ 1".to_owned()));
        let wall = folded(&a, Weight::Wall, FlameBy::Task);
        assert!(wall.contains(&"site.yml;Web: servers;copy it;h1 40".to_owned()), "{wall:?}");
        let cpu = folded(&a, Weight::Cpu, FlameBy::Task);
        assert!(cpu.contains(&"site.yml;Web: servers;copy it;h1;sh -c echo ~ 4".to_owned()), "{cpu:?}");
        // Without attribution: the plain process tree.
        let plain = folded(
            &Analysis::from_events(header(&["make"]), None, &events, &[]),
            Weight::Count,
            FlameBy::Task,
        );
        assert!(
            plain.contains(&"ansible-playbook;ansible-playbook (fork);sh -c echo ~ 1".to_owned()),
            "{plain:?}"
        );
    }

    #[test]
    fn svgs_render() {
        let analysis = Analysis::from_events(header(&["make"]), None, &[], &[]);
        let a = vec!["make;sh;cc 5".to_owned(), "make;sh;ld 1".to_owned()];
        let b = vec!["make;sh;cc 2".to_owned()];
        let mut out = Vec::new();
        svg(&analysis, &a, Weight::Count, &mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.contains("<svg") && s.contains("width = processes spawned") && s.contains("cc (5 processes"),
            "{s}"
        );
        let mut out = Vec::new();
        diff_svg(&a, &b, Weight::Count, "diff", &mut out).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("<svg"));
    }
}
