//! What both binaries do around their command: logging to stderr (`DELTAPLANE_LOG` filter),
//! a multi-threaded runtime, and `<name>: <error chain>` with a failure exit code.

use std::fmt;
use std::io::IsTerminal as _;
use std::process::ExitCode;

use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};

/// Runs `command` to completion on a new runtime after installing the tracing subscriber.
pub fn main(
    name: &str,
    default_filter: &str,
    command: impl Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DELTAPLANE_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        // Colour only for a terminal: a log file or journal gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .fmt_fields(OneLine)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every event on one line: whitespace runs holding a line break (sqlx pretty-prints the SQL
/// of a slow statement over many lines) become one space, and a statement (`db.statement`)
/// is cut to [`STATEMENT_CHARS`] characters; sqlx's `summary` field names it anyway.
struct OneLine;

const STATEMENT_CHARS: usize = 120;

impl<'w> FormatFields<'w> for OneLine {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut buf = String::new();
        DefaultFields::new().format_fields(Writer::new(&mut buf), fields)?;
        writer.write_str(&one_line(&buf))
    }
}

fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_whitespace() {
            let mut run = String::from(c);
            while let Some(&n) = chars.peek().filter(|n| n.is_whitespace()) {
                run.push(n);
                chars.next();
            }
            if run.contains('\n') {
                out.push(' ');
            } else {
                out.push_str(&run);
            }
        } else {
            out.push(c);
        }
    }
    shorten_statement(&out)
}

/// Cuts the value of `db.statement=` (up to the next ` name=` field) to `STATEMENT_CHARS`.
fn shorten_statement(line: &str) -> String {
    const KEY: &str = "db.statement=";
    let Some(at) = line.find(KEY) else {
        return line.to_owned();
    };
    let start = at + KEY.len();
    let rest = &line[start..];
    let end = next_field(rest).unwrap_or(rest.len());
    let value = rest[..end].trim();
    if value.chars().count() <= STATEMENT_CHARS {
        return line.to_owned();
    }
    let cut: String = value.chars().take(STATEMENT_CHARS).collect();
    format!("{}{cut}…{}", &line[..start], &rest[end..])
}

/// Where the next ` name=` field starts in `s` (a space, then an identifier, then `=`).
fn next_field(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while let Some(p) = s[i..].find(' ') {
        let from = i + p + 1;
        let name_len = bytes[from..]
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_' || **b == b'.')
            .count();
        if name_len > 0 && bytes.get(from + name_len) == Some(&b'=') {
            return Some(i + p);
        }
        i = from;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_statements_fit_one_line() {
        let sql = format!(
            "\n\n    SELECT\n      {}\n    FROM\n      dp_entities\n",
            "a, ".repeat(80)
        );
        let line = format!(
            "slow statement: execution time exceeded alert threshold summary=\"SELECT a, a, …\" db.statement={sql} rows_affected=0 elapsed=1.2s"
        );
        let one = one_line(&line);
        assert!(!one.contains('\n'), "{one}");
        assert!(one.contains("db.statement=SELECT a, a,"), "{one}");
        assert!(one.contains("… rows_affected=0 elapsed=1.2s"), "{one}");
        assert!(one.len() < 300, "{one}");
        assert_eq!(one_line("plain text=1 b=2"), "plain text=1 b=2");
    }
}
