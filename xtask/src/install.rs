//! `cargo xtask install`: the release binary where `sudo` finds it, its static build (shipped to
//! SSH targets), and the shell completions and man pages it generates itself (`spawntrace
//! generate`), so they match its CLI.
use std::{
    fs::File,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    setup,
    util::{root, run, show},
};

/// Where each installed file goes.
#[derive(Debug, PartialEq)]
pub struct Layout {
    pub bin: PathBuf,
    /// The static build shipped to SSH targets (spawntrace's `STATIC_BUILD`, from `bin`'s dir).
    pub static_build: PathBuf,
    pub bash: PathBuf,
    pub zsh: PathBuf,
    pub fish: PathBuf,
    pub man1: PathBuf,
}

impl Layout {
    /// The files under `prefix`, staged below `destdir` when given (as make's DESTDIR: the
    /// files land in DESTDIR/PREFIX/... but are meant to be run from PREFIX/...).
    pub fn new(prefix: &Path, destdir: Option<&Path>) -> Result<Layout> {
        ensure!(prefix.is_absolute(), "--prefix must be an absolute path, not {}", prefix.display());
        // `..` would step out of DESTDIR, and makes the sudo check below meaningless.
        ensure!(
            !prefix.components().any(|c| c == Component::ParentDir),
            "--prefix must not contain `..`: {}",
            prefix.display()
        );
        let base = match destdir {
            Some(d) => d.join(prefix.strip_prefix("/").expect("absolute")),
            None => prefix.to_owned(),
        };
        let share = base.join("share");
        Ok(Layout {
            bin: base.join("bin/spawntrace"),
            static_build: base.join("lib/spawntrace/spawntrace-static"),
            bash: share.join("bash-completion/completions/spawntrace"),
            zsh: share.join("zsh/site-functions/_spawntrace"),
            fish: share.join("fish/vendor_completions.d/spawntrace.fish"),
            man1: share.join("man/man1"),
        })
    }
}

pub fn install(prefix: &Path, destdir: Option<&Path>) -> Result<()> {
    let layout = Layout::new(prefix, destdir)?;
    setup::build_tools()?;
    run(Command::new("cargo").args(["build", "--release", "-p", "tracer"]).current_dir(root()))?;
    let built = target_dir()?.join("release/spawntrace");

    let mut binary = File::open(&built).with_context(|| format!("opening {}", built.display()))?;
    install_file(&layout.bin, 0o755, |f| Ok(std::io::copy(&mut binary, f).map(drop)?))?;
    install_static_build(&layout.static_build)?;
    for (shell, dest) in [("bash", &layout.bash), ("zsh", &layout.zsh), ("fish", &layout.fish)] {
        let script = generated(Command::new(&built).args(["generate", "completions", shell]))?;
        install_file(dest, 0o644, |f| Ok(f.write_all(&script)?))?;
    }
    let pages = tempfile::tempdir()?;
    generated(Command::new(&built).args(["generate", "man"]).arg(pages.path()))?;
    let mut names: Vec<_> =
        std::fs::read_dir(pages.path())?.map(|e| Ok(e?.file_name())).collect::<Result<_>>()?;
    names.sort();
    for name in names {
        let page = std::fs::read(pages.path().join(&name))?;
        install_file(&layout.man1.join(name), 0o644, |f| Ok(f.write_all(&page)?))?;
    }
    check_sudo_path(&prefix.join("bin"));
    Ok(())
}

/// The static (musl) build of spawntrace, installed at `dest`: what spawntrace ships to SSH
/// targets, whose C library may be older than this machine's.
pub fn install_static_build(dest: &Path) -> Result<()> {
    let target = setup::static_target();
    run(Command::new("cargo")
        .args(["build", "--release", "-p", "tracer", "--bin", "spawntrace", "--target", &target])
        .current_dir(root()))?;
    let built = target_dir()?.join(&target).join("release/spawntrace");
    let mut binary = File::open(&built).with_context(|| format!("opening {}", built.display()))?;
    install_file(dest, 0o755, |f| Ok(std::io::copy(&mut binary, f).map(drop)?))
}

/// Where the tests' and benchmarks' binaries (`target/debug`, `target/release`) find their
/// static build.
pub fn dev_static_build() -> Result<PathBuf> {
    Ok(target_dir()?.join("lib/spawntrace/spawntrace-static"))
}

/// Cargo's target directory, wherever CARGO_TARGET_DIR or a config file puts it.
fn target_dir() -> Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.args(["metadata", "--format-version", "1", "--no-deps"]).current_dir(root());
    let meta: serde_json::Value = serde_json::from_slice(&generated(&mut cmd)?).context("cargo metadata")?;
    meta["target_directory"].as_str().map(PathBuf::from).context("cargo metadata has no target_directory")
}

/// `cmd`'s stdout; fails with its command line and stderr when it fails.
fn generated(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("starting {}", show(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed with {}: {}", show(cmd), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}

/// Writes `dest` through a temporary file in its directory renamed over it, so that a running
/// spawntrace keeps its (unlinked) old binary and nobody sees a half-written file.
fn install_file(dest: &Path, mode: u32, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let dir = dest.parent().expect("installed files have a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = (|| {
        let mut tmp = tempfile::Builder::new().prefix(".spawntrace-install.").tempfile_in(dir)?;
        write(tmp.as_file_mut())?;
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(mode))?;
        tmp.as_file().sync_all()?;
        tmp.persist(dest)?;
        anyhow::Ok(())
    })();
    result.with_context(|| format!("installing {}", dest.display()))?;
    println!("install: {}", dest.display());
    Ok(())
}

/// sudo runs commands with its secure_path as PATH: warns when `sudo spawntrace` would not find
/// the binary in `bin_dir`, or when that cannot be told.
fn check_sudo_path(bin_dir: &Path) {
    match sudo_secure_path() {
        Ok(Some(path)) if !path.split(':').any(|d| Path::new(d) == bin_dir) => eprintln!(
            "install: warning: {} is not in sudo's secure_path ({path}): `sudo spawntrace` will not find it; \
             run `sudo {}/spawntrace`",
            bin_dir.display(),
            bin_dir.display()
        ),
        Ok(_) => {}
        Err(e) => eprintln!(
            "install: warning: cannot tell whether `sudo spawntrace` finds {}/spawntrace: {e:#}",
            bin_dir.display()
        ),
    }
}

/// The secure_path that sudo would set: from /etc/sudoers, then the files of /etc/sudoers.d in
/// the order sudo reads them (the last setting wins). None without sudo or a secure_path.
fn sudo_secure_path() -> Result<Option<String>> {
    let main = Path::new("/etc/sudoers");
    if !main.exists() {
        return Ok(None);
    }
    let mut texts =
        vec![std::fs::read_to_string(main).with_context(|| format!("reading {}", main.display()))?];
    if let Ok(entries) = std::fs::read_dir("/etc/sudoers.d") {
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| !n.contains('.') && !n.ends_with('~'))
            })
            .collect();
        files.sort();
        for file in files {
            texts
                .push(std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?);
        }
    }
    Ok(texts.iter().filter_map(|t| secure_path(t)).next_back())
}

/// The last `Defaults secure_path=...` of a sudoers file (global Defaults only, not those for
/// a user, host or command).
fn secure_path(sudoers: &str) -> Option<String> {
    let mut found = None;
    for line in sudoers.lines() {
        let Some(rest) = line.trim().strip_prefix("Defaults") else { continue };
        if !rest.starts_with([' ', '\t']) {
            continue;
        }
        let Some(at) = rest.find("secure_path") else { continue };
        let value = rest[at + "secure_path".len()..].trim_start();
        let Some(value) = value.strip_prefix('=') else { continue };
        let value = value.trim_start();
        found = Some(match value.strip_prefix('"') {
            Some(quoted) => quoted.split('"').next().unwrap_or_default(),
            None => value.split([',', ' ', '\t']).next().unwrap_or_default(),
        });
    }
    found.map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_under_prefix_and_destdir() {
        let l = Layout::new(Path::new("/usr/local"), Some(Path::new("/tmp/stage"))).unwrap();
        assert_eq!(
            l,
            Layout {
                bin: "/tmp/stage/usr/local/bin/spawntrace".into(),
                static_build: "/tmp/stage/usr/local/lib/spawntrace/spawntrace-static".into(),
                bash: "/tmp/stage/usr/local/share/bash-completion/completions/spawntrace".into(),
                zsh: "/tmp/stage/usr/local/share/zsh/site-functions/_spawntrace".into(),
                fish: "/tmp/stage/usr/local/share/fish/vendor_completions.d/spawntrace.fish".into(),
                man1: "/tmp/stage/usr/local/share/man/man1".into(),
            }
        );
        let l = Layout::new(Path::new("/opt/st"), None).unwrap();
        assert_eq!(l.bin, Path::new("/opt/st/bin/spawntrace"));
    }

    #[test]
    fn layout_refuses_relative_and_dotdot_prefixes() {
        assert!(Layout::new(Path::new("usr/local"), None).is_err());
        assert!(Layout::new(Path::new("/usr/../../etc"), Some(Path::new("/tmp/stage"))).is_err());
    }

    #[test]
    fn secure_path_from_sudoers() {
        let debian = "Defaults\tenv_reset\n# Defaults secure_path=\"/nope\"\n\
                      Defaults\tsecure_path=\"/usr/local/sbin:/usr/local/bin:/usr/bin\"\n";
        assert_eq!(secure_path(debian).as_deref(), Some("/usr/local/sbin:/usr/local/bin:/usr/bin"));
        assert_eq!(
            secure_path("Defaults env_reset, secure_path=/bin:/usr/bin, mail_badpass").as_deref(),
            Some("/bin:/usr/bin")
        );
        assert_eq!(secure_path("Defaults:alice secure_path=/x\nroot ALL=(ALL) ALL\n"), None);
        assert_eq!(
            secure_path("Defaults secure_path=/a\nDefaults secure_path = \"/b\"").as_deref(),
            Some("/b")
        );
    }
}
