//! `iamlet status`: which pod iamlet knows, which role it gets (or why none), and when its
//! cached credentials expire. Served on a Unix socket (`admin.status_socket`, mode 0600), a
//! channel pods have no route to, unlike the admin port. The protocol is the simplest there
//! is: connect, read the table, done; nothing a client sends is read.

use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::broker::PodStatus;
use crate::clock::Clock;
use crate::imds::timestamp;

/// What the table is made from, asked afresh for each connection.
pub type Source = Arc<dyn Fn() -> Vec<PodStatus> + Send + Sync>;

/// How long a client may take to read the table.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("admin.status_socket: {path} is in use by another running iamlet")]
    InUse { path: PathBuf },
    #[error("admin.status_socket: cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot reach iamlet's status socket {path} (is iamlet running, with this admin.status_socket?)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Binds the socket at `path`: creates its directory (0700), replaces a socket left by an
/// iamlet that is gone, and refuses to take over one that another iamlet still serves.
pub async fn bind(path: &Path) -> Result<UnixListener, Error> {
    let bind_error = |source| Error::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.exists()
    {
        std::fs::create_dir_all(parent).map_err(bind_error)?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))
            .map_err(bind_error)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(Error::InUse {
                path: path.to_owned(),
            });
        }
        std::fs::remove_file(path).map_err(bind_error)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    tracing::info!(key = "admin.status_socket", path = %path.display(), "listening");
    Ok(listener)
}

/// Answers every connection on `listener` with the table from `source`, until `cancel`; then
/// removes the socket file.
pub async fn serve(
    listener: UnixListener,
    source: Source,
    clock: Arc<dyn Clock>,
    cancel: CancellationToken,
) -> io::Result<()> {
    loop {
        let stream = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(error = %err, "status socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let table = render(&source(), clock.now());
        tokio::spawn(async move {
            let mut stream = stream;
            let written = tokio::time::timeout(WRITE_TIMEOUT, async {
                stream.write_all(table.as_bytes()).await?;
                stream.shutdown().await
            })
            .await;
            if !matches!(written, Ok(Ok(()))) {
                tracing::debug!("status socket: a client left before reading the table");
            }
        });
    }
    if let Ok(addr) = listener.local_addr()
        && let Some(path) = addr.as_pathname()
    {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Reads the table from the socket at `path` (`iamlet status`).
pub async fn fetch(path: &Path) -> Result<String, Error> {
    let connect_error = |source| Error::Connect {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path).await.map_err(connect_error)?;
    let mut table = String::new();
    tokio::time::timeout(WRITE_TIMEOUT, stream.read_to_string(&mut table))
        .await
        .map_err(|_| connect_error(io::Error::new(io::ErrorKind::TimedOut, "no answer")))?
        .map_err(connect_error)?;
    Ok(table)
}

/// The table: a header and one aligned line per pod.
pub fn render(lines: &[PodStatus], now: SystemTime) -> String {
    let rows: Vec<[String; 4]> = lines
        .iter()
        .map(|line| {
            let ip = line.ip.map_or_else(|| "-".to_owned(), |ip| ip.to_string());
            let (role, credentials) = match &line.role {
                Ok(role) => (
                    role.clone(),
                    match line.expires {
                        Some(at) => format!("expire {} ({})", timestamp(at), left(at, now)),
                        None => "not cached".to_owned(),
                    },
                ),
                Err(why) => (format!("none: {why}"), "-".to_owned()),
            };
            [ip, line.pod.clone(), role, credentials]
        })
        .collect();
    let header = ["IP", "POD", "ROLE", "CREDENTIALS"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut table = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let _ = writeln!(
            table,
            "{:w0$}  {:w1$}  {:w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    if rows.is_empty() {
        table.push_str("(no pods known)\n");
    }
    table
}

/// "in 52m" / "expired 3m ago".
fn left(at: SystemTime, now: SystemTime) -> String {
    match at.duration_since(now) {
        Ok(left) => format!("in {}m", left.as_secs() / 60),
        Err(past) => format!("expired {}m ago", past.duration().as_secs() / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn the_table_says_who_has_what_and_why_not() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let ip = |text: &str| Some(text.parse::<IpAddr>().expect("ip"));
        let table = render(
            &[
                PodStatus {
                    ip: ip("10.0.0.7"),
                    pod: "shop/web-0".into(),
                    role: Ok("arn:aws:iam::123456789012:role/web".into()),
                    expires: Some(now + Duration::from_secs(52 * 60 + 5)),
                },
                PodStatus {
                    ip: ip("10.0.0.8"),
                    pod: "shop/admin-0".into(),
                    role: Err(
                        "denied: namespace shop has no iam.amazonaws.com/permitted annotation"
                            .into(),
                    ),
                    expires: None,
                },
                PodStatus {
                    ip: None,
                    pod: "kube-system/proxy".into(),
                    role: Err("host network".into()),
                    expires: None,
                },
            ],
            now,
        );
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("IP "), "{table}");
        assert!(
            lines[1].contains("shop/web-0")
                && lines[1].contains("arn:aws:iam::123456789012:role/web")
        );
        assert!(
            lines[1].ends_with("expire 2023-11-14T23:05:25Z (in 52m)"),
            "{table}"
        );
        assert!(lines[2].contains("none: denied: namespace shop"), "{table}");
        assert!(lines[3].starts_with("-  ") && lines[3].contains("none: host network"));
        // Aligned: every line has its POD column at the same place.
        let at = lines[0].find("POD").expect("header");
        assert_eq!(lines[1].find("shop/web-0"), Some(at));
    }

    #[tokio::test]
    async fn a_live_socket_is_not_taken_over_and_a_stale_one_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run/status.sock");
        let listener = bind(&path).await.expect("bound");
        let mode = std::fs::metadata(&path)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(bind(&path).await, Err(Error::InUse { .. })));
        drop(listener);
        bind(&path).await.expect("a stale socket is replaced");
    }
}
