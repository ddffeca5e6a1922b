//! Output files are written whole or not at all: to `NAME.partial` next to the target, renamed
//! into place once complete.
use std::{
    fs::File,
    io::{BufWriter, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

/// `dir/NAME.partial` for `dir/NAME`.
pub fn partial_path(path: &Path) -> Result<PathBuf> {
    let mut name = path.file_name().context("output path has no file name")?.to_owned();
    name.push(".partial");
    Ok(path.with_file_name(name))
}

/// Writes `path` with `fill`; on any error the partial file is removed and `path` is untouched.
pub fn write_file(path: &Path, fill: impl FnOnce(&mut BufWriter<File>) -> Result<()>) -> Result<()> {
    let tmp = partial_path(path)?;
    let result = File::create(&tmp)
        .with_context(|| format!("cannot write {}", path.display()))
        .and_then(|f| {
            let mut w = BufWriter::new(f);
            fill(&mut w)?;
            w.flush().with_context(|| format!("writing {}", tmp.display()))
        })
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_writes_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.svg");
        let err = write_file(&p, |w| {
            w.write_all(b"half")?;
            anyhow::bail!("boom")
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        write_file(&p, |w| Ok(w.write_all(b"whole")?)).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "whole");
        assert!(write_file(Path::new("/nonexistent-dir/x"), |_| Ok(())).is_err());
    }
}
