//! Study storage: trials, their hyperparameters, per-epoch values, results
//! and states, in an SQLite database.
//!
//! A study also stores the model source and the run settings
//! ([`RunSettings`]) that all its trials share, and rejects a resume that
//! changes them.
//!
//! Every write is its own transaction, so a killed process loses at most
//! the trial it was running. The database runs in WAL mode, so readers
//! (`kiln study`) never block a sweep. Trials are claimed inside
//! `BEGIN IMMEDIATE` transactions, so two processes on the same study never
//! take the same trial number. The [`Storage`] trait is the seam for other
//! backends (a PostgreSQL server, for workers on many machines): the
//! sweep uses nothing else.

use rusqlite::{
    params, Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior,
};
use serde::{Deserialize, Serialize};
use std::fs::FileType;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot open study database `{path}`: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("study database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("corrupt study record: {0}")]
    Corrupt(String),
    #[error(
        "`{path}` holds a study of model `{found}`, not `{expected}`; use another --study file"
    )]
    OtherModel {
        path: String,
        found: String,
        expected: String,
    },
    #[error("`{path}` holds a study of another version of model `{model}` (its source text differs); use another --study file, or restore the source the study was made with")]
    ChangedSource { path: String, model: String },
    #[error("study database `{0}` not found")]
    NotFound(String),
    #[error("`{path}` is not a kiln study: {reason}. kiln left the file unchanged; use a study file written by `kiln tune`, or a new --study path to start one")]
    NotStudy { path: String, reason: String },
    #[error("`{path}` is not a regular file (it is {kind}), so it cannot be a study database; give the path of a study file, or of a new file to start one")]
    NotAFile { path: String, kind: &'static str },
    #[error("the folder `{folder}` does not exist, so the study `{path}` cannot be created; create the folder first, or choose a study path in an existing folder")]
    MissingFolder { path: String, folder: String },
    #[error("cannot create the study `{path}` because `{file}` is not a folder; choose another study path")]
    NotAFolder { path: String, file: String },
    #[error("`{path}` contains a study that was run with other settings, so its trials and this run's would not be comparable:{}\nResume it with the study's settings, or use a new --study path for a sweep with these settings", indented_lines(.differences))]
    ChangedSettings {
        path: String,
        differences: Vec<String>,
    },
}

/// Formats `lines` as an indented list, each on a new line.
fn indented_lines(lines: &[String]) -> String {
    lines.iter().map(|line| format!("\n  {line}")).collect()
}

/// The settings of a `kiln tune` run that decide what its trials' values
/// mean. All trials of a study share them, because the sampler and the
/// pruner compare values across trials.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    /// `--data`, as an absolute path.
    pub data: String,
    /// SHA-256, in hex, of the training samples and labels that trials
    /// train on: those loaded from `data`, after `--limit`.
    pub data_sha256: String,
    /// `--test-data`, as an absolute path.
    pub test_data: Option<String>,
    pub limit: Option<usize>,
    /// `--epochs`; `None` trains each trial for the model's `epochs`.
    pub epochs: Option<usize>,
    pub val_split: f64,
}

impl RunSettings {
    /// Lists how these settings differ from `stored`, the settings the
    /// study was created with, one line per option.
    pub fn differences(&self, stored: &RunSettings) -> Vec<String> {
        let mut lines = Vec::new();
        let mut compare = |option: &str, before: String, now: String| {
            if before != now {
                lines.push(format!("{option}: the study used {before}, this run {now}"));
            }
        };

        let quoted = |path: &str| format!("`{path}`");
        compare("--data", quoted(&stored.data), quoted(&self.data));
        let test_data = |path: &Option<String>| path.as_deref().map_or("none".into(), quoted);
        compare(
            "--test-data",
            test_data(&stored.test_data),
            test_data(&self.test_data),
        );

        let limit = |limit: Option<usize>| limit.map_or("none".into(), |l| l.to_string());
        compare("--limit", limit(stored.limit), limit(self.limit));
        let epochs =
            |epochs: Option<usize>| epochs.map_or("the model's `epochs`".into(), |e| e.to_string());
        compare("--epochs", epochs(stored.epochs), epochs(self.epochs));

        compare(
            "--val-split",
            stored.val_split.to_string(),
            self.val_split.to_string(),
        );

        // A changed path or limit is reported above. The same path and
        // limit with other samples means that the file changed or other
        // columns were read.
        if self.data == stored.data
            && self.limit == stored.limit
            && self.data_sha256 != stored.data_sha256
        {
            lines.push(format!(
                "--data: the samples or labels read from `{}` differ from the study's (the file changed, or --label-column selects another column)",
                self.data
            ));
        }
        lines
    }
}

/// A trial's life: `Running` until it ends as one of the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrialState {
    Running,
    Complete,
    Pruned,
    /// Diverged, errored, timed out, or its worker died.
    Failed,
    /// Shape check or budget failed; never trained.
    Rejected,
}

impl TrialState {
    pub fn as_str(self) -> &'static str {
        match self {
            TrialState::Running => "running",
            TrialState::Complete => "complete",
            TrialState::Pruned => "pruned",
            TrialState::Failed => "failed",
            TrialState::Rejected => "rejected",
        }
    }

    fn parse(s: &str) -> Result<TrialState, StorageError> {
        Ok(match s {
            "running" => TrialState::Running,
            "complete" => TrialState::Complete,
            "pruned" => TrialState::Pruned,
            "failed" => TrialState::Failed,
            "rejected" => TrialState::Rejected,
            other => return Err(StorageError::Corrupt(format!("unknown state `{other}`"))),
        })
    }
}

/// One trial as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trial {
    pub id: i64,
    pub number: i64,
    pub state: TrialState,
    /// Hyperparameter values as source text, in declaration order.
    pub params: Vec<(String, String)>,
    /// The objective: the best validation metric over the trial's epochs.
    pub value: Option<f64>,
    /// Test accuracy at the epoch of `value`, when test data was given.
    pub test_accuracy: Option<f64>,
    /// The validation metric after each epoch.
    pub epochs: Vec<f64>,
    pub error: Option<String>,
    pub checkpoint: Option<String>,
    /// The number of the trial this one repeats after its worker died.
    pub retry_of: Option<i64>,
    pub started: f64,
    pub finished: Option<f64>,
}

impl Trial {
    pub fn seconds(&self) -> Option<f64> {
        self.finished.map(|f| f - self.started)
    }
}

/// The parameters of a trial to claim.
pub struct NewTrial {
    pub params: Vec<(String, String)>,
    /// The number of the trial this one repeats.
    pub retry_of: Option<i64>,
}

/// The operations a sweep performs on its study.
pub trait Storage: Send {
    /// Returns every trial of the study, by number.
    fn trials(&mut self) -> Result<Vec<Trial>, StorageError>;
    /// Inserts a running trial owned by this process with the next number,
    /// unless `limit` reports that the study has enough finished or running
    /// trials. Returns the new trial.
    fn claim(
        &mut self,
        trial: NewTrial,
        limit: &dyn Fn(&[Trial]) -> bool,
    ) -> Result<Option<Trial>, StorageError>;
    /// Records a trial's validation metric after an epoch.
    fn report(&mut self, id: i64, epoch: usize, value: f64) -> Result<(), StorageError>;
    /// Records how a trial ended.
    fn finish(&mut self, id: i64, end: &TrialEnd) -> Result<(), StorageError>;
    /// Marks running trials whose worker is gone as failed, and returns
    /// them.
    fn reap_dead(&mut self) -> Result<Vec<Trial>, StorageError>;
}

/// How a trial ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialEnd {
    pub state: TrialState,
    pub value: Option<f64>,
    pub test_accuracy: Option<f64>,
    pub error: Option<String>,
    pub checkpoint: Option<String>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `host:pid`, naming the process that runs a trial.
fn owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}

/// Whether the process named by `owner` still runs. Owners on other hosts
/// count as alive: only their own host can tell.
fn owner_alive(owner: &str) -> bool {
    let Some((host, pid)) = owner.rsplit_once(':') else {
        return false;
    };
    let this = self::owner();
    let this_host = this.rsplit_once(':').map_or("", |(h, _)| h);
    if host != this_host {
        return true;
    }
    let Ok(pid) = pid.parse::<i32>() else {
        return false;
    };
    if pid as u32 == std::process::id() {
        return true;
    }
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Runs `f` until it does not fail with "database is locked", for at most
/// 30 seconds.
fn retry_busy<T>(mut f: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match f() {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// An SQLite study database.
pub struct SqliteStorage {
    conn: Connection,
    study: i64,
    owner: String,
    settings_adopted: bool,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    source TEXT NOT NULL,
    source_sha256 TEXT NOT NULL,
    metric TEXT NOT NULL,
    created REAL NOT NULL,
    run_settings TEXT
);
CREATE TABLE IF NOT EXISTS trials (
    id INTEGER PRIMARY KEY,
    study INTEGER NOT NULL REFERENCES studies(id),
    number INTEGER NOT NULL,
    state TEXT NOT NULL,
    params TEXT NOT NULL,
    value REAL,
    test_accuracy REAL,
    error TEXT,
    checkpoint TEXT,
    owner TEXT NOT NULL,
    retry_of INTEGER,
    started REAL NOT NULL,
    finished REAL,
    UNIQUE (study, number)
);
CREATE TABLE IF NOT EXISTS trial_values (
    trial INTEGER NOT NULL REFERENCES trials(id),
    epoch INTEGER NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (trial, epoch)
);
";

/// Checks that `path` can be a study file, before SQLite opens it: an
/// existing regular file, or a new file in an existing folder. The SQLite
/// that rusqlite bundles (3.50.2) opens `/dev/null`, creates
/// `/dev/null-journal` beside it and then fails with "disk I/O error". For
/// a missing folder it reports only "unable to open database file".
///
/// # Errors
/// [`StorageError::NotAFile`] when `path` exists but is not a regular file,
/// [`StorageError::MissingFolder`] or [`StorageError::NotAFolder`] when the
/// folder of a new file does not exist or is a file.
pub fn check_path(path: &Path) -> Result<(), StorageError> {
    if is_regular_file(path)? {
        return Ok(());
    }
    check_folder(path)
}

/// Checks that the folder of the new study file `path` exists, by finding
/// the nearest path above `path` that exists.
fn check_folder(path: &Path) -> Result<(), StorageError> {
    let Some(folder) = path.parent().filter(|f| !f.as_os_str().is_empty()) else {
        // A bare file name is created in the current folder.
        return Ok(());
    };
    let missing = || StorageError::MissingFolder {
        path: path.display().to_string(),
        folder: folder.display().to_string(),
    };
    for ancestor in folder.ancestors() {
        // A relative path's last ancestor is the empty path, which is the
        // current folder, so every folder below it is missing.
        if ancestor.as_os_str().is_empty() {
            break;
        }
        match std::fs::metadata(ancestor) {
            Ok(meta) if meta.is_dir() && ancestor == folder => return Ok(()),
            Ok(meta) if meta.is_dir() => return Err(missing()),
            Ok(_) => {
                return Err(StorageError::NotAFolder {
                    path: path.display().to_string(),
                    file: ancestor.display().to_string(),
                })
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                continue
            }
            // Other failures, such as a folder without search permission,
            // are left to SQLite, which reports them when it opens the file.
            Err(_) => return Ok(()),
        }
    }
    Err(missing())
}

/// Checks that `path` is a regular file (or a link to one) if anything is
/// there. Returns `false` when nothing is there.
///
/// # Errors
/// [`StorageError::NotAFile`] when `path` is a folder, a device or another
/// kind of file.
fn is_regular_file(path: &Path) -> Result<bool, StorageError> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(false);
    };
    if meta.is_file() {
        return Ok(true);
    }
    Err(StorageError::NotAFile {
        path: path.display().to_string(),
        kind: file_kind(&meta.file_type()),
    })
}

/// Names a kind of file that is not a regular file, for messages.
fn file_kind(file_type: &FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_dir() {
        "a folder"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_fifo() {
        "a named pipe"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

/// The study that a sweep expects to find in its database, or creates.
struct StudyRow<'a> {
    model: &'a str,
    source: &'a str,
    source_sha256: String,
    metric: &'a str,
    settings: &'a RunSettings,
}

/// Adds the `run_settings` column to the `studies` table of a study
/// created before kiln stored run settings. Its rows get `NULL` there.
fn add_settings_column(tx: &Transaction) -> Result<(), StorageError> {
    let columns = names(tx, "SELECT name FROM pragma_table_info('studies')")?;
    if !columns.iter().any(|c| c == "run_settings") {
        tx.execute_batch("ALTER TABLE studies ADD COLUMN run_settings TEXT")?;
    }
    Ok(())
}

/// Finds the study in the database and checks that it is `expected`, or
/// inserts `expected` when the database has no study. Returns the study's
/// id, and whether the study had no run settings and now has
/// `expected.settings`.
///
/// # Errors
/// When the study is of another model, of another source text of the
/// model, or was run with another metric or other settings.
fn find_or_create_study(
    tx: &Transaction,
    path: &Path,
    expected: &StudyRow,
) -> Result<(i64, bool), StorageError> {
    let settings_json = serde_json::to_string(expected.settings)
        .map_err(|e| StorageError::Corrupt(e.to_string()))?;
    let existing: Option<(i64, String, String, String, Option<String>)> = tx
        .query_row(
            "SELECT id, model, source_sha256, metric, run_settings FROM studies ORDER BY id LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()?;

    let Some((id, model, source_sha256, metric, stored)) = existing else {
        tx.execute(
            "INSERT INTO studies (model, source, source_sha256, metric, created, run_settings)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                expected.model,
                expected.source,
                expected.source_sha256,
                expected.metric,
                now(),
                settings_json
            ],
        )?;
        return Ok((tx.last_insert_rowid(), false));
    };

    if model != expected.model {
        return Err(StorageError::OtherModel {
            path: path.display().to_string(),
            found: model,
            expected: expected.model.to_string(),
        });
    }
    if source_sha256 != expected.source_sha256 {
        return Err(StorageError::ChangedSource {
            path: path.display().to_string(),
            model,
        });
    }

    let mut differences = Vec::new();
    if metric != expected.metric {
        differences.push(format!(
            "--metric: the study used {metric}, this run {}",
            expected.metric
        ));
    }
    let stored: Option<RunSettings> = stored
        .map(|json| serde_json::from_str(&json))
        .transpose()
        .map_err(|e| StorageError::Corrupt(format!("run settings of the study: {e}")))?;
    if let Some(stored) = &stored {
        differences.extend(expected.settings.differences(stored));
    }
    if !differences.is_empty() {
        return Err(StorageError::ChangedSettings {
            path: path.display().to_string(),
            differences,
        });
    }

    if stored.is_none() {
        tx.execute(
            "UPDATE studies SET run_settings = ?2 WHERE id = ?1",
            params![id, settings_json],
        )?;
    }
    Ok((id, stored.is_none()))
}

/// Columns of the `studies` table that every kiln version writes.
const STUDY_COLUMNS: [&str; 4] = ["model", "source", "source_sha256", "metric"];

/// Checks, without writing, that the database at `path` is empty or
/// contains a kiln study. Returns whether it contains the `studies` table.
///
/// # Errors
/// [`StorageError::NotStudy`] when the file is not an SQLite database, or
/// its tables are another program's.
fn check_study_tables(conn: &Connection, path: &Path) -> Result<bool, StorageError> {
    let not_study = |reason: String| StorageError::NotStudy {
        path: path.display().to_string(),
        reason,
    };
    let tables = match names(
        conn,
        r"SELECT name FROM sqlite_master
          WHERE type = 'table' AND name NOT LIKE 'sqlite\_%' ESCAPE '\'
          ORDER BY name",
    ) {
        Ok(tables) => tables,
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == ErrorCode::NotADatabase => {
            return Err(not_study("it is not an SQLite database".into()))
        }
        Err(source) => {
            return Err(StorageError::Open {
                path: path.display().to_string(),
                source,
            })
        }
    };
    if tables.is_empty() {
        return Ok(false);
    }
    if !tables.iter().any(|t| t == "studies") {
        return Err(not_study(format!(
            "it contains the tables {} but no `studies` table",
            quoted_list(&tables)
        )));
    }
    let columns = names(conn, "SELECT name FROM pragma_table_info('studies')")?;
    let missing: Vec<String> = STUDY_COLUMNS
        .iter()
        .filter(|c| !columns.iter().any(|name| name == *c))
        .map(|c| c.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(not_study(format!(
            "its `studies` table lacks the columns {}",
            quoted_list(&missing)
        )));
    }
    Ok(true)
}

/// Runs `query` and collects its first column as text.
fn names(conn: &Connection, query: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(query)?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    rows.collect()
}

/// Formats up to five names as `` `a`, `b` ``, and counts the rest.
fn quoted_list(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text += &format!(" and {} more", names.len() - SHOWN);
    }
    text
}

impl SqliteStorage {
    /// Opens (creating if needed) the study of `model` in the database at
    /// `path`. A new study stores `settings`, and an existing one must have
    /// been created with the same `settings` and `metric`.
    ///
    /// # Errors
    /// When `path` is not a regular file or is in a missing folder. Also when
    /// the file cannot be opened as an SQLite database, contains another
    /// program's tables, or contains a study of another model or of other
    /// settings.
    pub fn open(
        path: &Path,
        model: &str,
        source: &str,
        metric: &str,
        settings: &RunSettings,
    ) -> Result<SqliteStorage, StorageError> {
        check_path(path)?;
        let open_error = |source| StorageError::Open {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open(path).map_err(open_error)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        // The check comes before the first write, so another program's
        // database keeps its journal mode and gets no kiln tables.
        check_study_tables(&conn, path)?;
        // Switching a new file to WAL needs an exclusive lock, which the busy
        // timeout does not wait for; a second process creating the same study
        // at the same moment retries instead of failing.
        retry_busy(|| conn.pragma_update(None, "journal_mode", "WAL")).map_err(open_error)?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // One transaction creates the tables and creates or checks the study
        // row, so two processes that start the same study at once share one
        // row with one set of run settings.
        let tx = retry_busy(|| Transaction::new_unchecked(&conn, TransactionBehavior::Immediate))
            .map_err(open_error)?;
        tx.execute_batch(SCHEMA)?;
        add_settings_column(&tx)?;
        let expected = StudyRow {
            model,
            source,
            source_sha256: crate::runtime::checkpoint::sha256_hex(source),
            metric,
            settings,
        };
        let (study, settings_adopted) = find_or_create_study(&tx, path, &expected)?;
        tx.commit()?;
        Ok(SqliteStorage {
            conn,
            study,
            owner: owner(),
            settings_adopted,
        })
    }

    /// Returns whether [`SqliteStorage::open`] stored its run settings in a
    /// study created by a kiln version that did not store them. The earlier
    /// trials of such a study may have used other settings.
    pub fn settings_adopted(&self) -> bool {
        self.settings_adopted
    }

    /// Opens an existing study for reading.
    ///
    /// # Errors
    /// When the file is missing or is not a study database.
    pub fn open_existing(path: &Path) -> Result<SqliteStorage, StorageError> {
        if !is_regular_file(path)? {
            return Err(StorageError::NotFound(path.display().to_string()));
        }
        let conn = Connection::open(path).map_err(|source| StorageError::Open {
            path: path.display().to_string(),
            source,
        })?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        if !check_study_tables(&conn, path)? {
            return Err(StorageError::NotStudy {
                path: path.display().to_string(),
                reason: "it has no tables".into(),
            });
        }
        let study: i64 = conn
            .query_row("SELECT id FROM studies ORDER BY id LIMIT 1", [], |r| {
                r.get(0)
            })
            .map_err(|source| StorageError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Ok(SqliteStorage {
            conn,
            study,
            owner: owner(),
            settings_adopted: false,
        })
    }

    /// The studied model's name, its source text and the objective's
    /// metric.
    ///
    /// # Errors
    /// On database errors.
    pub fn study_info(&self) -> Result<(String, String, String), StorageError> {
        Ok(self.conn.query_row(
            "SELECT model, source, metric FROM studies WHERE id = ?1",
            [self.study],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?)
    }

    fn load_trials(conn: &Connection, study: i64) -> Result<Vec<Trial>, StorageError> {
        // The `retry_of` column stores the retried trial's row id, which
        // users never see, so it is read back as that trial's number.
        let mut stmt = conn.prepare(
            "SELECT t.id, t.number, t.state, t.params, t.value, t.test_accuracy, t.error, t.checkpoint,
                    retried.number, t.started, t.finished
             FROM trials t LEFT JOIN trials retried ON retried.id = t.retry_of
             WHERE t.study = ?1 ORDER BY t.number",
        )?;
        let rows = stmt.query_map([study], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<f64>>(4)?,
                r.get::<_, Option<f64>>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, Option<String>>(7)?,
                r.get::<_, Option<i64>>(8)?,
                r.get::<_, f64>(9)?,
                r.get::<_, Option<f64>>(10)?,
            ))
        })?;
        let mut values =
            conn.prepare("SELECT value FROM trial_values WHERE trial = ?1 ORDER BY epoch")?;
        let mut trials = Vec::new();
        for row in rows {
            let (
                id,
                number,
                state,
                params,
                value,
                test,
                error,
                checkpoint,
                retry_of,
                started,
                finished,
            ) = row?;
            let params: Vec<(String, String)> = serde_json::from_str(&params)
                .map_err(|e| StorageError::Corrupt(format!("parameters of trial {number}: {e}")))?;
            let epochs = values
                .query_map([id], |r| r.get::<_, f64>(0))?
                .collect::<Result<Vec<f64>, _>>()?;
            trials.push(Trial {
                id,
                number,
                state: TrialState::parse(&state)?,
                params,
                value,
                test_accuracy: test,
                epochs,
                error,
                checkpoint,
                retry_of,
                started,
                finished,
            });
        }
        Ok(trials)
    }
}

impl Storage for SqliteStorage {
    fn trials(&mut self) -> Result<Vec<Trial>, StorageError> {
        Self::load_trials(&self.conn, self.study)
    }

    fn claim(
        &mut self,
        trial: NewTrial,
        limit: &dyn Fn(&[Trial]) -> bool,
    ) -> Result<Option<Trial>, StorageError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let trials = Self::load_trials(&tx, self.study)?;
        if limit(&trials) {
            return Ok(None);
        }
        let number = trials.iter().map(|t| t.number + 1).max().unwrap_or(0);
        let params_json = serde_json::to_string(&trial.params)
            .map_err(|e| StorageError::Corrupt(e.to_string()))?;
        let started = now();
        tx.execute(
            "INSERT INTO trials (study, number, state, params, owner, retry_of, started)
             VALUES (?1, ?2, 'running', ?3, ?4,
                     (SELECT id FROM trials WHERE study = ?1 AND number = ?5), ?6)",
            params![
                self.study,
                number,
                params_json,
                self.owner,
                trial.retry_of,
                started
            ],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(Some(Trial {
            id,
            number,
            state: TrialState::Running,
            params: trial.params,
            value: None,
            test_accuracy: None,
            epochs: Vec::new(),
            error: None,
            checkpoint: None,
            retry_of: trial.retry_of,
            started,
            finished: None,
        }))
    }

    fn report(&mut self, id: i64, epoch: usize, value: f64) -> Result<(), StorageError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO trial_values (trial, epoch, value) VALUES (?1, ?2, ?3)",
            params![id, epoch as i64, value],
        )?;
        Ok(())
    }

    fn finish(&mut self, id: i64, end: &TrialEnd) -> Result<(), StorageError> {
        self.conn.execute(
            "UPDATE trials SET state = ?2, value = ?3, test_accuracy = ?4, error = ?5, checkpoint = ?6, finished = ?7
             WHERE id = ?1",
            params![
                id,
                end.state.as_str(),
                end.value,
                end.test_accuracy,
                end.error,
                end.checkpoint,
                now()
            ],
        )?;
        Ok(())
    }

    fn reap_dead(&mut self) -> Result<Vec<Trial>, StorageError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut stmt =
            tx.prepare("SELECT id, owner FROM trials WHERE study = ?1 AND state = 'running'")?;
        let running: Vec<(i64, String)> = stmt
            .query_map([self.study], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        drop(stmt);
        let mut dead = Vec::new();
        for (id, owner) in running {
            if owner != self.owner && !owner_alive(&owner) {
                tx.execute(
                    "UPDATE trials SET state = 'failed', error = ?2, finished = ?3 WHERE id = ?1",
                    params![
                        id,
                        format!(
                            "{}its worker ({owner}) stopped before the trial finished",
                            super::UNFINISHED
                        ),
                        now()
                    ],
                )?;
                dead.push(id);
            }
        }
        tx.commit()?;
        let trials = Self::load_trials(&self.conn, self.study)?;
        Ok(trials
            .into_iter()
            .filter(|t| dead.contains(&t.id))
            .collect())
    }
}
