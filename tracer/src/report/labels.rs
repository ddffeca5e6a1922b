//! Names of processes as the outputs print them (the flamegraph, the timeline, the summary), and
//! text made safe for a terminal.
use crate::{ansible::processes::describe, model::Model};

/// `s` safe to print on a terminal: control characters (escape sequences, carriage returns,
/// newlines: an exe name is whatever the traced command made it) become `\xNN`.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if c.is_control() && (c as u32) < 0x100 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.into()
}

/// A whole rendered text (lines of our own making) made safe for a terminal: what
/// [`printable`] does, except for the newlines that end our lines.
pub fn printable_text(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() && c != '\n') {
        return s.into();
    }
    s.split('\n').map(|l| printable(l).into_owned()).collect::<Vec<_>>().join("\n").into()
}

/// The process's label; fork-only processes get their parent's label plus ` (fork)`.
pub fn label(model: &Model, i: usize) -> String {
    let p = &model.processes[i];
    match p.execs.last() {
        Some(e) => describe(&e.filename, &e.argv),
        None => match p.parent {
            Some(parent) => format!("{} (fork)", label_without_fork(model, parent)),
            None => "(fork)".to_owned(),
        },
    }
}

/// The label of process `i` of an SSH target whose recorded sshd session is `session` (a process
/// whose exec came before the recording: named here).
pub fn target_label(model: &Model, i: usize, session: Option<usize>) -> String {
    const SESSION: &str = "sshd session";
    let p = &model.processes[i];
    match (Some(i) == session, p.execs.is_empty(), p.parent) {
        (true, _, _) => SESSION.to_owned(),
        (false, true, Some(parent)) if Some(parent) == session => format!("{SESSION} (fork)"),
        _ => label(model, i),
    }
}

fn label_without_fork(model: &Model, i: usize) -> String {
    let l = label(model, i);
    l.strip_suffix(" (fork)").map(str::to_owned).unwrap_or(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_for_terminals() {
        assert_eq!(printable("plain name"), "plain name");
        assert_eq!(printable("evil\x1b]0;owned\x07\r\n"), "evil\\x1b]0;owned\\x07\\x0d\\x0a");
        assert_eq!(printable_text("a\x1b[2J\nb\n"), "a\\x1b[2J\nb\n");
    }
}
