//! Logging: tracing with a human or JSON formatter on stderr. Records from the `log` facade
//! (aya-log's kernel records among them) are bridged into the same output.

use std::sync::OnceLock;

use tracing_subscriber::{
    layer::{Layered, SubscriberExt},
    reload,
    util::SubscriberInitExt,
    EnvFilter, Layer, Registry,
};

use crate::types::LogFormat;

type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type FmtLayer = Box<dyn Layer<Filtered> + Send + Sync>;

/// Handles to change the running subscriber's filter and format (the admin API).
struct Handles {
    filter: reload::Handle<EnvFilter, Registry>,
    format: reload::Handle<FmtLayer, Filtered>,
}

static HANDLES: OnceLock<Handles> = OnceLock::new();

fn fmt_layer(format: LogFormat) -> FmtLayer {
    match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(std::io::stderr)
            .boxed(),
        // Colour codes only for a person at a terminal: in a pipe, a file or a container
        // log they are noise.
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed(),
    }
}

pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, filter_handle) = reload::Layer::new(filter);
    let (fmt, format_handle) = reload::Layer::new(fmt_layer(format));
    // try_init also installs the log->tracing bridge; a second init (tests) is harmless.
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = HANDLES.set(Handles {
            filter: filter_handle,
            format: format_handle,
        });
    }
}

fn handles() -> Result<&'static Handles, String> {
    HANDLES
        .get()
        .ok_or_else(|| "logging was not initialised by this process".to_string())
}

/// Sets the log filter at runtime (e.g. `debug`, `info,agent::proxy=trace`).
pub fn set_level(filter: &str) -> Result<(), String> {
    let f = EnvFilter::try_new(filter).map_err(|e| format!("`{filter}`: {e}"))?;
    handles()?.filter.reload(f).map_err(|e| e.to_string())
}

/// Switches between human and JSON output at runtime.
pub fn set_format(format: LogFormat) -> Result<(), String> {
    handles()?
        .format
        .reload(fmt_layer(format))
        .map_err(|e| e.to_string())
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
