//! `tsunagu import`: Part-10 files and directory trees through the same
//! ingest path as C-STORE, in parallel, with a progress bar and a summary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;

use super::{Ingest, IngestError, Outcome};
use crate::access::Institution;
use crate::dicom::part10;

/// Bytes handed to the spool worker at a time.
const IMPORT_CHUNK: usize = 256 * 1024;

/// Files ingested at once: enough to overlap fsyncs, few enough for 2 cores.
const PARALLEL_FILES: usize = 4;

/// What an import did.
#[derive(Debug, Default, Clone)]
pub struct ImportReport {
    pub stored: u64,
    pub already_present: u64,
    pub replaced: u64,
    pub bytes: u64,
    /// (file, reason) of every rejected file.
    pub rejected: Vec<(PathBuf, String)>,
}

/// Expand files and directories (recursively) into a sorted file list.
pub fn collect_files(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            for e in walkdir::WalkDir::new(p)
                .sort_by_file_name()
                .into_iter()
                .flatten()
            {
                if e.file_type().is_file() {
                    out.push(e.into_path());
                }
            }
        } else {
            out.push(p.clone());
        }
    }
    out
}

async fn import_one(
    ingest: &Ingest,
    inst: &Institution,
    file: &Path,
) -> Result<(Outcome, u64), IngestError> {
    let (meta, offset, size) = {
        let f = file.to_path_buf();
        tokio::task::spawn_blocking(move || -> Result<_, IngestError> {
            let fh = std::fs::File::open(&f).map_err(IngestError::Spool)?;
            let size = fh.metadata().map_err(IngestError::Spool)?.len();
            let (meta, offset) = part10::read_meta(std::io::BufReader::new(fh))
                .map_err(|e| IngestError::Unparsable(e.into()))?;
            Ok((meta, offset, size))
        })
        .await
        .map_err(|e| IngestError::Internal(e.to_string()))??
    };
    let mut spool = ingest
        .begin(
            part10::FileMeta {
                source_ae_title: None,
                ..meta
            },
            inst,
        )
        .await?;
    let mut f = tokio::fs::File::open(file)
        .await
        .map_err(IngestError::Spool)?;
    tokio::io::AsyncSeekExt::seek(&mut f, std::io::SeekFrom::Start(offset))
        .await
        .map_err(IngestError::Spool)?;
    loop {
        let mut buf = Vec::with_capacity(IMPORT_CHUNK);
        let n = (&mut f)
            .take(IMPORT_CHUNK as u64)
            .read_to_end(&mut buf)
            .await
            .map_err(IngestError::Spool)?;
        if n == 0 {
            break;
        }
        spool.write(buf.into()).await?;
    }
    let actor = crate::audit::Actor {
        user: "tsunagu import".into(),
        institution: inst.code.clone(),
        role: "admin".into(),
        client: format!("file:{}", file.display()),
    };
    let accepted = ingest.finish(spool, inst, None, &actor).await?;
    Ok((accepted.outcome, size))
}

/// Import `files` for `inst`; never stops at the first bad file.
pub async fn import_files(
    ingest: Ingest,
    inst: Arc<Institution>,
    files: Vec<PathBuf>,
    show_progress: bool,
) -> ImportReport {
    let total_bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let bar = if show_progress {
        let b = ProgressBar::new(total_bytes);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .expect("static template"),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let mut tally = Tally::new(bar, files.len());
    let mut tasks: JoinSet<Result<(Outcome, u64), IngestError>> = JoinSet::new();
    for file in files {
        // Results are taken in as files finish, so the bar moves with them.
        while tasks.len() >= PARALLEL_FILES {
            let joined = tasks.join_next_with_id().await.expect("tasks running");
            tally.take(joined);
        }
        let (ingest, inst) = (ingest.clone(), inst.clone());
        let path = file.clone();
        let id = tasks
            .spawn(async move { import_one(&ingest, &inst, &path).await })
            .id();
        tally.running.insert(id, file);
    }
    while let Some(joined) = tasks.join_next_with_id().await {
        tally.take(joined);
    }
    let Tally {
        mut report, bar, ..
    } = tally;
    bar.finish_and_clear();
    report.rejected.sort();
    report
}

/// The report and the bar, as each file's task ends.
struct Tally {
    report: ImportReport,
    bar: ProgressBar,
    done: usize,
    count: usize,
    /// The file of each running task (a task that panics names none).
    running: HashMap<tokio::task::Id, PathBuf>,
}

type Joined =
    Result<(tokio::task::Id, Result<(Outcome, u64), IngestError>), tokio::task::JoinError>;

impl Tally {
    fn new(bar: ProgressBar, count: usize) -> Self {
        Self {
            report: ImportReport::default(),
            bar,
            done: 0,
            count,
            running: HashMap::new(),
        }
    }

    fn take(&mut self, joined: Joined) {
        let (id, r) = match joined {
            Ok((id, r)) => (id, r.map_err(|e| e.to_string())),
            // Never dropped unreported: a file whose import panicked is
            // rejected, so the exit status says something went wrong.
            Err(e) => (e.id(), Err(format!("internal error: {e}"))),
        };
        let file = self
            .running
            .remove(&id)
            .expect("every task's file is noted");
        self.done += 1;
        match r {
            Ok((outcome, size)) => {
                self.report.bytes += size;
                self.bar.inc(size);
                match outcome {
                    Outcome::Stored => self.report.stored += 1,
                    Outcome::AlreadyPresent => self.report.already_present += 1,
                    Outcome::Replaced => self.report.replaced += 1,
                }
            }
            Err(reason) => {
                if let Ok(m) = std::fs::metadata(&file) {
                    self.bar.inc(m.len());
                }
                self.report.rejected.push((file, reason));
            }
        }
        self.bar
            .set_message(format!("{}/{} files", self.done, self.count));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file whose task panicked is reported as rejected, by its name.
    #[tokio::test]
    async fn a_panicked_import_is_rejected() {
        let mut tally = Tally::new(ProgressBar::hidden(), 1);
        let mut tasks: JoinSet<Result<(Outcome, u64), IngestError>> = JoinSet::new();
        let id = tasks.spawn(async { panic!("decoder bug") }).id();
        tally.running.insert(id, PathBuf::from("a.dcm"));
        tally.take(tasks.join_next_with_id().await.unwrap());
        assert_eq!(tally.report.stored, 0);
        assert_eq!(tally.report.rejected.len(), 1);
        assert_eq!(tally.report.rejected[0].0, PathBuf::from("a.dcm"));
        assert!(
            tally.report.rejected[0].1.contains("panic"),
            "{:?}",
            tally.report.rejected
        );
    }
}
