//! `tsunagu import`: Part-10 files and directory trees through the same
//! ingest path as C-STORE, in parallel, with a progress bar and a summary.

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
    // Each file's size, for the bar (also when its import fails).
    let files: Vec<(PathBuf, u64)> = files
        .into_iter()
        .map(|f| {
            let size = std::fs::metadata(&f).map_or(0, |m| m.len());
            (f, size)
        })
        .collect();
    let total_bytes = files.iter().map(|(_, size)| size).sum();
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
    let mut tally = Tally {
        report: ImportReport::default(),
        bar,
        count: files.len(),
    };
    let mut tasks = JoinSet::new();
    for (file, size) in files {
        // Results are taken in as files finish, so the bar moves with them.
        while tasks.len() >= PARALLEL_FILES {
            tally.take(joined(tasks.join_next().await));
        }
        let (ingest, inst) = (ingest.clone(), inst.clone());
        tasks.spawn(async move {
            let result = caught(import_one(&ingest, &inst, &file)).await;
            (file, size, result)
        });
    }
    while let Some(done) = tasks.join_next().await {
        tally.take(joined(Some(done)));
    }
    let Tally {
        mut report, bar, ..
    } = tally;
    bar.finish_and_clear();
    report.rejected.sort();
    report
}

/// A file's import, and what it came to.
type Imported = (PathBuf, u64, Result<(Outcome, u64), String>);

/// A task's result: the tasks catch their panics and are never cancelled.
fn joined(done: Option<Result<Imported, tokio::task::JoinError>>) -> Imported {
    done.expect("tasks running")
        .expect("import tasks catch their panics and are not cancelled")
}

/// `import`'s result, a panic in it included: never dropped unreported, a
/// file whose import panicked is rejected, so the exit status says so.
async fn caught(
    import: impl Future<Output = Result<(Outcome, u64), IngestError>>,
) -> Result<(Outcome, u64), String> {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(import).catch_unwind().await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(panic) => Err(format!(
            "internal error: panicked: {}",
            crate::imaging::panic_message(&panic)
        )),
    }
}

/// The report and the bar, as each file's task ends.
struct Tally {
    report: ImportReport,
    bar: ProgressBar,
    count: usize,
}

impl Tally {
    fn take(&mut self, (file, size, result): Imported) {
        self.bar.inc(size);
        match result {
            Ok((outcome, stored_size)) => {
                self.report.bytes += stored_size;
                match outcome {
                    Outcome::Stored => self.report.stored += 1,
                    Outcome::AlreadyPresent => self.report.already_present += 1,
                    Outcome::Replaced => self.report.replaced += 1,
                }
            }
            Err(reason) => self.report.rejected.push((file, reason)),
        }
        let r = &self.report;
        let done = r.stored + r.already_present + r.replaced + r.rejected.len() as u64;
        self.bar.set_message(format!("{done}/{} files", self.count));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file whose task panicked is reported as rejected, by its name.
    #[tokio::test]
    async fn a_panicked_import_is_rejected() {
        let mut tally = Tally {
            report: ImportReport::default(),
            bar: ProgressBar::hidden(),
            count: 1,
        };
        let result = caught(async { panic!("decoder bug") }).await;
        tally.take((PathBuf::from("a.dcm"), 0, result));
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
