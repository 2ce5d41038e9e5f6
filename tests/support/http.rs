//! A raw HTTP/1.1 client whose socket is bound to a chosen source IP: on loopback, a client
//! bound to 127.0.0.x stands for the pod with that IP. Raw, so tests control every byte
//! (a PUT with no body and no Content-Length, oversized headers, half-sent requests).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {:?}", self.body))
    }
}

/// Connects to `to` from `from`.
pub async fn connect(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = if from.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind source");
    socket.connect(to).await.expect("connect")
}

/// Sends one request with `Connection: close` and reads the whole answer.
pub async fn request(
    from: IpAddr,
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    request_for("169.254.169.254", from, to, method, path, headers).await
}

/// As [`request`], with `host` as the `Host` header.
pub async fn request_for(
    host: &str,
    from: IpAddr,
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    send_raw(from, to, head.as_bytes()).await
}

/// Writes `bytes` as they are and parses the answer.
pub async fn send_raw(from: IpAddr, to: SocketAddr, bytes: &[u8]) -> Reply {
    let mut stream = connect(from, to).await;
    stream.write_all(bytes).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut raw))
        .await
        .expect("an answer within 20 s")
        .expect("read");
    parse(&raw)
}

pub fn parse(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

pub fn ip(text: &str) -> IpAddr {
    text.parse().expect("an IP address")
}

/// A GET from `from`, with an optional IMDSv2 token.
pub async fn get(from: IpAddr, to: SocketAddr, path: &str, token: Option<&str>) -> Reply {
    match token {
        Some(token) => {
            request(
                from,
                to,
                "GET",
                path,
                &[("X-aws-ec2-metadata-token", token)],
            )
            .await
        }
        None => request(from, to, "GET", path, &[]).await,
    }
}

/// A token for `from`, asserting that one was issued.
pub async fn token(from: IpAddr, to: SocketAddr) -> String {
    let reply = request(
        from,
        to,
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")],
    )
    .await;
    assert_eq!(reply.status, 200, "token refused: {reply:?}");
    reply.body
}
