//! Log lines: `tracing` events, to stderr, as text or JSON. The agent emits them; this binary
//! alone decides where they go.

use tracing_subscriber::filter::LevelFilter;

/// The least severe log lines written.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// How each log line is written.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `TIME LEVEL TARGET: MESSAGE FIELD=VALUE...`
    Text,
    /// One JSON object a line: timestamp, level, message, target and every field.
    Json,
}

/// Sends every later log line to stderr, filtered and formatted as asked. A reader of
/// stderr that went away loses the lines and stops nothing: the write error is dropped
/// (tracing-subscriber would otherwise `eprintln!` it, which panics on EPIPE).
pub fn init(level: Level, format: Format) {
    let level = match level {
        Level::Error => LevelFilter::ERROR,
        Level::Warn => LevelFilter::WARN,
        Level::Info => LevelFilter::INFO,
        Level::Debug => LevelFilter::DEBUG,
        Level::Trace => LevelFilter::TRACE,
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .log_internal_errors(false);
    // Only fails when a subscriber is set already, which nothing else here does.
    let _ = match format {
        Format::Text => builder.try_init(),
        Format::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
}
