//! Logging: tracing to stderr, as text or JSON.

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

/// The `[log]` section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `error`, `warn`, `info` or `debug` (one line per request), or full tracing directives.
    pub level: String,
    pub format: Format,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            level: "info".to_owned(),
            format: Format::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Text,
    Json,
}

/// Dependencies that would otherwise log whole requests at `debug`; they speak only of trouble.
const QUIET_DEPENDENCIES: &[&str] = &[
    "aws_config",
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "aws_smithy_http_client",
    "aws_sdk_sts",
    "aws_runtime",
    "hyper",
    "hyper_util",
    "rustls",
    "h2",
];

/// Levels a bare word may name. tracing would read any other bare word as a target, so
/// `verbose` would turn on one target nobody has and silence everything else.
const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

/// The filter for a configured level: the level for iamlet, `warn` for chatty dependencies.
pub fn filter(level: &str) -> Result<EnvFilter, String> {
    for directive in level.split(',').map(str::trim) {
        if !directive.contains('=') && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{directive:?} is not a level: use error, warn, info, debug, trace or off, or \
                 target=level directives such as \"info,iamlet::imds=debug\""
            ));
        }
    }
    let mut directives = level.to_owned();
    if !level.contains('=') {
        for dependency in QUIET_DEPENDENCIES {
            directives.push_str(&format!(",{dependency}=warn"));
        }
    }
    EnvFilter::try_new(&directives).map_err(|err| err.to_string())
}

/// Installs the global subscriber. Call once, from `main`.
pub fn init(config: &Config) -> Result<(), String> {
    let filter = filter(&config.level)?;
    // Colours only for a terminal: escape codes would litter log files and pipes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let installed = match config.format {
        Format::Text => builder.try_init(),
        Format::Json => builder.json().flatten_event(true).try_init(),
    };
    installed.map_err(|err| err.to_string())
}

/// An error and its sources on one line, for a log field: many errors (the AWS SDK's, TLS)
/// say little at the top level.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_words_must_be_levels() {
        for ok in [
            "info",
            "DEBUG",
            "warn,iamlet::imds=debug",
            "off",
            "iamlet=trace",
        ] {
            assert!(filter(ok).is_ok(), "{ok}");
        }
        for bad in ["verbose", "info,verbose", "", "iamlet=verbose"] {
            assert!(filter(bad).is_err(), "{bad:?}");
        }
    }
}
