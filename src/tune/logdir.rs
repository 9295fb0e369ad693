//! Checks and claims a sweep's `--logdir` before any trial runs.
//!
//! Every study names its runs `trial-<number>`, so two studies in one
//! folder would write into the same runs, and TensorBoard would show the
//! first study's experiment for both. The marker file [`MARKER`] names the
//! study database and model that own a folder, and only that study may
//! resume into it.

use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The marker's file name in the logdir. TensorBoard ignores files that
/// are not event files.
pub const MARKER: &str = "kiln-study.json";

/// The study that owns a logdir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The study database, as an absolute path.
    pub study: PathBuf,
    pub model: String,
}

/// Checks, without writing anything, that `owner` can write its sweep into
/// `logdir`. `study_exists` is whether the study database exists already.
///
/// # Errors
/// A message naming the path and the fix, when `logdir` or the nearest
/// folder that exists above it is not a writable folder, or when `logdir`
/// contains runs of another study.
pub fn check(logdir: &Path, owner: &Owner, study_exists: bool) -> Result<(), String> {
    let logdir_text = logdir.display();
    match std::fs::metadata(logdir) {
        Ok(meta) if !meta.is_dir() => Err(format!(
            "--logdir `{logdir_text}` is not a folder; choose a new folder for the sweep's summaries"
        )),
        Ok(_) => {
            check_writable(logdir, logdir)?;
            check_owner(logdir, owner, study_exists)
        }
        Err(_) => check_creatable(logdir),
    }
}

/// Creates `logdir` and writes its marker unless it has one.
///
/// # Errors
/// When the folder or the marker cannot be written.
pub fn claim(logdir: &Path, owner: &Owner) -> std::io::Result<()> {
    std::fs::create_dir_all(logdir)?;
    let marker = logdir.join(MARKER);
    if marker.exists() {
        return Ok(());
    }
    let text = serde_json::to_string_pretty(owner).map_err(std::io::Error::other)?;
    std::fs::write(marker, text + "\n")
}

/// Checks that the missing folder `logdir` can be created: the nearest
/// path above it that exists must be a writable folder.
fn check_creatable(logdir: &Path) -> Result<(), String> {
    let logdir_text = logdir.display();
    for ancestor in logdir.ancestors().skip(1) {
        // A relative path's last ancestor is the empty path: the current
        // folder.
        let ancestor = if ancestor.as_os_str().is_empty() {
            Path::new(".")
        } else {
            ancestor
        };
        match std::fs::metadata(ancestor) {
            Ok(meta) if meta.is_dir() => return probe_create(logdir, ancestor),
            Ok(_) => {
                return Err(format!(
                    "--logdir `{logdir_text}` is inside `{}`, which is not a folder; choose another path",
                    ancestor.display()
                ))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("cannot use --logdir `{logdir_text}`: {e}")),
        }
    }
    Err(format!(
        "cannot use --logdir `{logdir_text}`: no folder above it exists"
    ))
}

/// Creates the missing folders from `existing` down to `logdir` and
/// removes them again. Creating them is the one check that holds on every
/// file system, where permissions alone miss, say, `/proc` for root.
fn probe_create(logdir: &Path, existing: &Path) -> Result<(), String> {
    let created = std::fs::create_dir_all(logdir);
    // Only the folders below `existing` are new, so only they are removed,
    // deepest first. A folder that another process filled meanwhile stays.
    for dir in logdir.ancestors().take_while(|d| *d != existing) {
        if dir.as_os_str().is_empty() {
            break;
        }
        let _ = std::fs::remove_dir(dir);
    }
    created.map_err(|e| {
        format!(
            "cannot create --logdir `{}` ({e}); choose another path",
            logdir.display()
        )
    })
}

/// Checks that files can be created in the folder `dir`, on the way to
/// `logdir`.
///
/// NOTE: `access(2)` checks the process's permissions and read-only
/// mounts, but not for every file system: for root, an existing folder in
/// `/proc` passes, and the first write into it then fails after the study
/// database was created.
fn check_writable(logdir: &Path, dir: &Path) -> Result<(), String> {
    let unwritable = |e: std::io::Error| {
        format!(
            "cannot write --logdir `{}`: `{}` is not writable ({e}); choose another path",
            logdir.display(),
            dir.display()
        )
    };
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| unwritable(std::io::Error::from(ErrorKind::InvalidInput)))?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let status = unsafe { libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) };
    if status != 0 {
        return Err(unwritable(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Checks that the existing folder `logdir` is empty of runs or belongs to
/// `owner`.
fn check_owner(logdir: &Path, owner: &Owner, study_exists: bool) -> Result<(), String> {
    let logdir_text = logdir.display();
    let marker = logdir.join(MARKER);
    let text = match std::fs::read_to_string(&marker) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => return check_no_runs(logdir),
        Err(e) => return Err(format!("cannot read `{}`: {e}", marker.display())),
    };
    let found: Owner = serde_json::from_str(&text).map_err(|e| {
        format!(
            "`{}` is not a kiln study marker ({e}); choose a new --logdir",
            marker.display()
        )
    })?;
    if found != *owner {
        return Err(format!(
            "--logdir `{logdir_text}` holds the sweep of study `{}` (model `{}`); \
             give each study a new --logdir, so that their trials stay apart",
            found.study.display(),
            found.model
        ));
    }
    if !study_exists {
        // A new database at the old path numbers its trials from 0 again,
        // into the old study's runs.
        return Err(format!(
            "--logdir `{logdir_text}` holds the sweep of an earlier study at `{}`, which no longer \
             exists; choose a new --logdir, or delete the old one",
            owner.study.display()
        ));
    }
    Ok(())
}

/// Checks that a folder without a marker contains no runs or event files,
/// such as a sweep of an older kiln or a `kiln train --logdir` leaves.
fn check_no_runs(logdir: &Path) -> Result<(), String> {
    let logdir_text = logdir.display();
    let entries = std::fs::read_dir(logdir)
        .map_err(|e| format!("cannot read --logdir `{logdir_text}`: {e}"))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("trial-") || name.starts_with("events.out.tfevents.") {
            return Err(format!(
                "--logdir `{logdir_text}` already holds TensorBoard summaries (`{name}`) that no \
                 study claims; choose a new or empty folder"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-logdir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn owner(study: &str) -> Owner {
        Owner {
            study: PathBuf::from(study),
            model: "m".into(),
        }
    }

    #[test]
    fn claimed_logdir_accepts_only_its_owner() {
        let dir = temp_dir("owner").join("logs");
        assert_eq!(check(&dir, &owner("/a.study"), false), Ok(()));
        assert!(!dir.exists(), "the check left its probe folder");
        claim(&dir, &owner("/a.study")).unwrap();
        assert_eq!(check(&dir, &owner("/a.study"), true), Ok(()));
        let other = check(&dir, &owner("/b.study"), false).unwrap_err();
        assert!(other.contains("/a.study"), "{other}");
        let recreated = check(&dir, &owner("/a.study"), false).unwrap_err();
        assert!(recreated.contains("no longer exists"), "{recreated}");
    }

    #[test]
    fn unclaimed_runs_are_rejected() {
        let dir = temp_dir("runs");
        std::fs::create_dir(dir.join("trial-0")).unwrap();
        let error = check(&dir, &owner("/a.study"), false).unwrap_err();
        assert!(error.contains("trial-0"), "{error}");
    }

    #[test]
    fn files_in_the_path_are_rejected() {
        let dir = temp_dir("file");
        let file = dir.join("file");
        std::fs::write(&file, "").unwrap();
        let error = check(&file, &owner("/a.study"), false).unwrap_err();
        assert!(error.contains("is not a folder"), "{error}");
        let error = check(&file.join("logs"), &owner("/a.study"), false).unwrap_err();
        assert!(error.contains("inside"), "{error}");
    }
}
