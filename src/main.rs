use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The DICOM parser reports the end of every received data set as an
    // error, and its errors capture a backtrace whenever RUST_BACKTRACE is
    // set: a stack walk per stored object, for a backtrace nobody reads.
    // RUST_LIB_BACKTRACE governs such library backtraces alone (panics keep
    // theirs); it is set before any thread exists, as `set_var` requires.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: no other thread runs yet (the runtime starts below).
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tsunagu: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        tsunagu::telemetry::init_logging();
        tsunagu::cli::run(tsunagu::cli::Cli::parse()).await
    })
}
