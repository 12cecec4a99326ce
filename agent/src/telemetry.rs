//! Logging: tracing with a human or JSON formatter on stderr. Records from the `log` facade
//! (aya-log's kernel records among them) are bridged into the same output.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

type Reload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Changes the filter of the running subscriber (the admin API's log-level endpoint).
static RELOAD: std::sync::OnceLock<Reload> = std::sync::OnceLock::new();

pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    // try_init also installs the log->tracing bridge; a second init (tests) is harmless.
    macro_rules! install {
        ($b:expr) => {{
            let b = $b
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_filter_reloading();
            let handle = b.reload_handle();
            if b.try_init().is_ok() {
                let _ = RELOAD.set(Box::new(move |f: &str| {
                    let filter = EnvFilter::try_new(f).map_err(|e| format!("`{f}`: {e}"))?;
                    handle.reload(filter).map_err(|e| e.to_string())
                }));
            }
        }};
    }
    match format {
        LogFormat::Json => install!(tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)),
        LogFormat::Human => install!(tracing_subscriber::fmt()),
    }
}

/// Sets the log filter at runtime (e.g. `debug`, `info,agent::proxy=trace`).
pub fn set_level(filter: &str) -> Result<(), String> {
    match RELOAD.get() {
        Some(reload) => reload(filter),
        None => Err("logging was not initialised by this process".into()),
    }
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
