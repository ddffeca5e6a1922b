//! Short, recognisable names for processes, shared by the flamegraph and the timeline:
//! `sh -c mkdir ansible-tmp`, `python AnsiballZ_copy`, `ssh`, `rm -rf tmp`, …
use crate::model::{Model, Process, basename};

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

/// What kind of work a process is, for category breakdowns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A Python process running an Ansible module (AnsiballZ payload).
    Module,
    /// Shell plumbing: sh -c wrappers and the housekeeping commands they run.
    Shell,
    /// ssh, sftp, scp.
    Ssh,
    /// Anything else (python without a module, other programs, forks without exec).
    Other,
}

const SHELLS: &[&str] = &["sh", "bash", "dash", "zsh"];
const HOUSEKEEPING: &[&str] =
    &["mkdir", "chmod", "rm", "sleep", "echo", "cat", "mv", "cp", "chown", "stat", "true", "test"];

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

fn label_without_fork(model: &Model, i: usize) -> String {
    let l = label(model, i);
    l.strip_suffix(" (fork)").map(str::to_owned).unwrap_or(l)
}

/// The kind of work a process does (fork-only processes take their image's kind).
pub fn kind(model: &Model, i: usize) -> Kind {
    let mut cur = Some(i);
    while let Some(c) = cur {
        let p: &Process = &model.processes[c];
        if let Some(e) = p.execs.last() {
            return kind_of(&e.filename, &e.argv);
        }
        cur = p.parent;
    }
    Kind::Other
}

fn kind_of(filename: &str, argv: &[String]) -> Kind {
    let exe = basename(filename);
    if argv.iter().any(|a| a.contains("AnsiballZ_")) && exe.starts_with("python") {
        return Kind::Module;
    }
    if exe.starts_with("python") && argv.len() == 1 {
        // A pipelined module: the payload arrives on stdin.
        return Kind::Module;
    }
    match exe {
        "ssh" | "sftp" | "scp" => Kind::Ssh,
        e if SHELLS.contains(&e) || HOUSEKEEPING.contains(&e) => Kind::Shell,
        _ => Kind::Other,
    }
}

/// A label from an exec's filename and argv.
pub fn describe(filename: &str, argv: &[String]) -> String {
    let exe =
        argv.first().map(|a| basename(a)).filter(|a| !a.is_empty()).unwrap_or_else(|| basename(filename));
    if SHELLS.contains(&exe) && argv.get(1).map(String::as_str) == Some("-c") {
        return format!("{exe} -c {}", script_gist(argv.get(2).map(String::as_str).unwrap_or("")));
    }
    if exe.starts_with("python") {
        if let Some(m) = argv.iter().find_map(|a| ansiballz(a)) {
            return format!("{exe} {m}");
        }
        return match argv.get(1).map(String::as_str) {
            None => format!("{exe} (stdin)"),
            Some("-c") => format!("{exe} -c"),
            Some("-m") => format!("{exe} -m {}", argv.get(2).map(String::as_str).unwrap_or("")),
            Some(s) => format!("{exe} {}", basename(s)),
        };
    }
    match exe {
        "rm" if argv.iter().any(|a| a.contains("ansible-tmp")) => "rm -rf ansible-tmp".to_owned(),
        "mkdir" if argv.iter().any(|a| a.contains("ansible-tmp")) => "mkdir ansible-tmp".to_owned(),
        _ => exe.to_owned(),
    }
}

/// `AnsiballZ_copy` from `/root/.ansible/tmp/ansible-tmp-…/AnsiballZ_copy.py`.
fn ansiballz(arg: &str) -> Option<String> {
    let at = arg.find("AnsiballZ_")?;
    let rest = &arg[at..];
    let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
    Some(rest[..end].to_owned())
}

/// What a `sh -c` script is about, in a few words.
fn script_gist(script: &str) -> String {
    // Ansible nests: /bin/sh -c "/bin/sh -c 'echo ~root && sleep 0'".
    let inner = script
        .trim()
        .trim_start_matches("/bin/sh -c ")
        .trim_matches(|c| c == '\'' || c == '"')
        .trim_start_matches(['(', ' ']);
    if let Some(m) = ansiballz(inner) {
        return format!("python {m}");
    }
    if inner.contains("ansible-tmp") && inner.contains("mkdir") {
        return "mkdir ansible-tmp".into();
    }
    if inner.starts_with("echo ~") {
        return "echo ~".into();
    }
    if inner.starts_with("rm -f -r") || inner.starts_with("rm -rf") {
        return "rm -rf tmp".into();
    }
    let first = inner.split_whitespace().next().unwrap_or("");
    let first = basename(first);
    if first.starts_with("python") || first.contains("/python") {
        return "python".into();
    }
    first.chars().take(24).collect()
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

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn ansible_shapes_are_recognisable() {
        let cases = [
            (v(&["/bin/sh", "-c", "/bin/sh -c 'echo ~root && sleep 0'"]), "sh -c echo ~", Kind::Shell),
            (
                v(&[
                    "/bin/sh",
                    "-c",
                    "( umask 77 && mkdir -p \"` echo /root/.ansible/tmp `\"&& mkdir \"` echo /root/.ansible/tmp/ansible-tmp-1-2-3 `\" ) && sleep 0",
                ]),
                "sh -c mkdir ansible-tmp",
                Kind::Shell,
            ),
            (
                v(&[
                    "/bin/sh",
                    "-c",
                    "rm -f -r /root/.ansible/tmp/ansible-tmp-1/ > /dev/null 2>&1 && sleep 0",
                ]),
                "sh -c rm -rf tmp",
                Kind::Shell,
            ),
            (
                v(&[
                    "/bin/sh",
                    "-c",
                    "/usr/bin/python3 /root/.ansible/tmp/ansible-tmp-1/AnsiballZ_copy.py && sleep 0",
                ]),
                "sh -c python AnsiballZ_copy",
                Kind::Shell,
            ),
            (
                v(&["/usr/bin/python3", "/root/.ansible/tmp/ansible-tmp-1/AnsiballZ_stat.py"]),
                "python3 AnsiballZ_stat",
                Kind::Module,
            ),
            (v(&["/venv/bin/python"]), "python (stdin)", Kind::Module),
            (v(&["/usr/bin/ssh", "-C", "-o", "ControlMaster=auto", "h1"]), "ssh", Kind::Ssh),
            (v(&["chmod", "u+rwx", "/x"]), "chmod", Kind::Shell),
            (v(&["/usr/bin/make", "all"]), "make", Kind::Other),
        ];
        for (argv, want, kind) in cases {
            assert_eq!(describe(&argv[0], &argv), want, "{argv:?}");
            assert_eq!(kind_of(&argv[0], &argv), kind, "{argv:?}");
        }
    }
}
