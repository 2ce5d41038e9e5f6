//! The admin port: `/healthz`, `/readyz` and `/metrics`. It listens apart from the pod-facing
//! port, so pods never reach it through the interception rule. What it tells (liveness, the
//! readiness reason, counters labelled by route, status and error kind) names no pod, role or
//! credential, so it may listen on the node's IP for Prometheus; keep anything more private off
//! this port.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::http_server::{self, Limits};
use crate::metrics::Metrics;

/// The `[admin]` section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: SocketAddr,
    /// The Unix socket `iamlet status` reads (pods have no route to it); empty = none.
    pub status_socket: std::path::PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ([127, 0, 0, 1], 8182).into(),
            status_socket: std::path::PathBuf::from("/run/iamlet/status.sock"),
        }
    }
}

/// Whether iamlet can answer pods now: `Ok` with a word on how current it is, or `Err` with
/// the reason it cannot.
pub type Readiness = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Serves the admin endpoints on `listener` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    metrics: Metrics,
    limits: Limits,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    http_server::serve(listener, limits, cancel, move |_, request: Request<_>| {
        let response = answer(request.method(), request.uri().path(), &readiness, &metrics);
        async move { response }
    })
    .await
}

fn answer(
    method: &Method,
    path: &str,
    readiness: &Readiness,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        );
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match readiness() {
            Ok(detail) => text(StatusCode::OK, format!("ready: {detail}\n")),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        },
        "/metrics" => {
            metrics.set_ready(readiness().is_ok());
            let mut response = text(StatusCode::OK, metrics.encode());
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// GETs `path` from the admin port at `addr` (an unspecified address means this host), for
/// `iamlet health`. Returns the status code and body.
pub async fn probe(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use http_body_util::{BodyExt, Empty};
    use std::io::{Error, ErrorKind};
    use std::time::Duration;

    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(Error::other)?;
        tokio::spawn(connection);
        let request = Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(Error::other)?;
        let response = sender.send_request(request).await.map_err(Error::other)?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(Error::other)?;
        Ok((
            status,
            String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        ))
    };
    let answer = tokio::time::timeout(Duration::from_secs(3), exchange)
        .await
        .unwrap_or_else(|_| Err(Error::new(ErrorKind::TimedOut, "no answer within 3s")));
    // Name the address: a wrong port or a config that is not the running iamlet's shows at once.
    answer.map_err(|err| {
        Error::new(
            err.kind(),
            format!("cannot reach the admin port at {addr} (admin.listen): {err}"),
        )
    })
}
