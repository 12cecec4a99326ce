//! Logging: tracing with a human or JSON formatter on stderr. Records from the `log` facade
//! (aya-log's kernel records among them) are bridged into the same output.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init also installs the log->tracing bridge; a second init (tests) is harmless.
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

/// aya-log's numeric level for a tracing filter: the kernel checks it before emitting a
/// record, so a quiet agent pays nothing for the programs' debug statements.
pub fn kernel_log_level(filter: &str) -> u8 {
    let f = filter.to_ascii_lowercase();
    if f.contains("trace") {
        5
    } else if f.contains("debug") {
        4
    } else if f.contains("info") {
        3
    } else if f.contains("warn") {
        2
    } else if f.contains("off") {
        0
    } else {
        1
    }
}
