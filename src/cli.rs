//! The command line: `serve`, `import`, `reindex`, `token`, `config check`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::auth::{self, Role};
use crate::config::Config;
use crate::hub::Hub;
use crate::ingest::import;

#[derive(Debug, Parser)]
#[command(
    name = "tsunagu",
    version,
    about = "DICOM image-exchange hub for a regional hospital network"
)]
pub struct Cli {
    /// Configuration file (TOML); environment TSUNAGU_* overrides it.
    #[arg(long, global = true, env = "TSUNAGU_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the DICOM and HTTP servers.
    Serve,
    /// Store Part-10 files (and directory trees) for an institution.
    Import {
        /// Institution code the objects belong to.
        #[arg(long)]
        institution: String,
        /// Files or directories (searched recursively).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Rebuild the search index from the object store alone.
    Reindex,
    /// Mint a bearer token (JWT, HS256 with auth.hs256_secret) for local setups.
    Token {
        /// Institution code of the user.
        #[arg(long)]
        institution: String,
        /// User name (the `sub` claim).
        #[arg(long)]
        user: String,
        #[arg(long, value_enum)]
        role: Role,
        /// Lifetime, e.g. 8h, 30m, 3600s.
        #[arg(long, default_value = "8h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditAction {
    /// Recompute the audit trail's hash chain; fails if any event was
    /// changed, removed or reordered.
    Verify,
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Validate the configuration and print it (secrets masked).
    Check,
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::FAILURE
}

/// Run the chosen subcommand.
pub async fn run(cli: Cli) -> ExitCode {
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match cli.command {
        Command::Config {
            action: ConfigAction::Check,
        } => {
            // Certificates and keys are read and matched as `serve` would.
            if let Some(t) = &config.server.tls
                && let Err(e) = crate::dimse::tls::TlsMaterial::load(t)
            {
                return fail(e);
            }
            if let Some(t) = &config.server.http_tls
                && let Err(e) = crate::web::https::server_config(t)
            {
                return fail(e);
            }
            if let Err(e) = crate::audit::chain::ChainKey::from_config(&config.audit) {
                return fail(e);
            }
            println!("{}", config.to_masked_toml());
            ExitCode::SUCCESS
        }
        Command::Token {
            institution,
            user,
            role,
            ttl,
        } => {
            if !config.institutions.iter().any(|i| i.code == institution) {
                return fail(format!("institution {institution} is not configured"));
            }
            match auth::mint(
                &config.auth,
                &institution,
                &user,
                role,
                ttl,
                std::time::SystemTime::now(),
            ) {
                Ok(t) => {
                    println!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Serve => {
            let hub = match Hub::open(config).await {
                Ok(h) => h,
                Err(e) => return fail(e),
            };
            let mut running = match hub.start().await {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            let stop = running.shutdown.clone();
            tokio::spawn(async move {
                stopped().await;
                tracing::info!("shutting down");
                stop.cancel();
            });
            while running.tasks.join_next().await.is_some() {}
            hub.index.settle().await;
            hub.audit.flush().await;
            ExitCode::SUCCESS
        }
        Command::Import {
            institution,
            paths,
            quiet,
        } => {
            let hub = match Hub::open(config).await {
                Ok(h) => h,
                Err(e) => return fail(e),
            };
            let Some(inst) = hub.institutions.by_code(&institution) else {
                return fail(format!("institution {institution} is not configured"));
            };
            let files = import::collect_files(&paths);
            let started = std::time::Instant::now();
            let report = import::import_files(hub.ingest.clone(), inst, files, !quiet).await;
            hub.audit.flush().await;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "stored {} · already present {} · replaced {} · rejected {} · {:.1} MB in {:.1} s",
                report.stored,
                report.already_present,
                report.replaced,
                report.rejected.len(),
                report.bytes as f64 / 1e6,
                secs
            );
            for (file, why) in &report.rejected {
                println!("rejected {}: {why}", file.display());
            }
            if report.rejected.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Audit {
            action: AuditAction::Verify,
        } => {
            let key = match crate::audit::chain::ChainKey::from_config(&config.audit) {
                Ok(k) => k,
                Err(e) => return fail(e),
            };
            let index = match crate::index::Index::connect(&config.index).await {
                Ok(i) => i,
                Err(e) => return fail(e),
            };
            match crate::audit::chain::verify(&index, key.as_ref()).await {
                Ok(v) => match v.broken_at {
                    None => {
                        let keyed = match v.keyed_from {
                            Some(k) => format!("keyed from event {k}"),
                            None => "not keyed".into(),
                        };
                        println!("audit trail intact: {} events, {keyed}", v.events);
                        ExitCode::SUCCESS
                    }
                    Some((seq, why)) => {
                        println!("audit trail BROKEN at event {seq}: {why}");
                        ExitCode::FAILURE
                    }
                },
                Err(e) => fail(e),
            }
        }
        Command::Reindex => {
            let hub = match Hub::open(config).await {
                Ok(h) => h,
                Err(e) => return fail(e),
            };
            match hub.reindex(true).await {
                Ok(r) => {
                    println!("indexed {} · failed {}", r.indexed, r.failed.len());
                    for (key, why) in &r.failed {
                        println!("failed {key}: {why}");
                    }
                    if r.failed.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => fail(e),
            }
        }
    }
}

/// Ctrl-C, or SIGTERM (what service managers and container runtimes send).
async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
