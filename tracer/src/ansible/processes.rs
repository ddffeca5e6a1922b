//! What the processes of an Ansible run are: module interpreters (AnsiballZ), shell helpers,
//! ssh connections, and short recognisable names for them (`sh -c mkdir ansible-tmp`,
//! `python3 AnsiballZ_copy`, `rm -rf tmp`, …). Ansible's own knowledge, kept here so the
//! process model and the outputs stay generic.
use crate::model::{Model, Process, basename};

/// Whether an opened path is a module's unpacked AnsiballZ payload (`…_payload.zip`): where a
/// module's start-up (interpreter and AnsiballZ unpacking, what a warm agent saves) ends. The
/// process model notes each process's first such open ([`Model::marking_opens`]).
pub fn is_module_payload(path: &str) -> bool {
    path.contains("_payload.zip")
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
    /// A long-lived interpreter that runs modules in itself: Mitogen's context, whose argv[0]
    /// Mitogen sets to `python3(mitogen:user@host:pid)`.
    Agent,
    /// Anything else (python without a module, other programs, forks without exec).
    Other,
}

const SHELLS: &[&str] = &["sh", "bash", "dash", "zsh"];
const HOUSEKEEPING: &[&str] =
    &["mkdir", "chmod", "rm", "sleep", "echo", "cat", "mv", "cp", "chown", "stat", "true", "test"];

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
    if argv.first().is_some_and(|a| a.contains("(mitogen:")) {
        return Kind::Agent;
    }
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
