//! Fair share: one runaway pod (many connections, requests with no pause) cannot starve the
//! others. The real binary, moto as STS; a raw client bound to 127.0.0.9 is the runaway, and
//! aws-config's unmodified IMDS credentials provider (1 s timeouts) is the well-behaved pod.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use support::http::{get, ip};
use support::iamlet::{Iamlet, Setup, pod};
use support::{moto, rust_sdk, sts_front};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
const RUNAWAY: &str = "127.0.0.9";
/// Connections the runaway keeps trying to hold: more than iamlet serves at once in this test.
const RUNAWAY_CONNECTIONS: usize = 96;
/// Bound on the runaway's connection attempts, so the test stops by itself.
const MAX_ATTEMPTS: usize = 20_000;

/// One keep-alive connection from `from`, sending requests back to back until `stop`, the
/// connection closes, or the attempt budget is spent. Returns the replies' status codes.
async fn hammer(
    from: IpAddr,
    to: SocketAddr,
    stop: Arc<AtomicBool>,
    attempts: Arc<AtomicUsize>,
) -> Vec<u16> {
    let mut statuses = Vec::new();
    while !stop.load(Ordering::Relaxed) && attempts.fetch_add(1, Ordering::Relaxed) < MAX_ATTEMPTS {
        let Some(mut stream) = connect(from, to).await else {
            continue;
        };
        let request = format!("GET {CREDS}runaway HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n");
        let mut buffer = Vec::new();
        loop {
            if stop.load(Ordering::Relaxed) || stream.write_all(request.as_bytes()).await.is_err() {
                break;
            }
            match read_reply(&mut stream, &mut buffer).await {
                Some(status) => statuses.push(status),
                None => break, // closed: refused at accept, or told to go away
            }
        }
    }
    statuses
}

/// A connection from `from`, or `None` when the attempt fails (the backlog is full).
async fn connect(from: IpAddr, to: SocketAddr) -> Option<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(from, 0)).ok()?;
    socket.connect(to).await.ok()
}

/// Reads one keep-alive reply's head and body; its status, or `None` once the peer closed.
async fn read_reply(stream: &mut tokio::net::TcpStream, buffer: &mut Vec<u8>) -> Option<u16> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buffer.len() >= end + 4 + length {
                let status = head.split_whitespace().nth(1)?.parse().ok()?;
                buffer.drain(..end + 4 + length);
                return Some(status);
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_pod_cannot_starve_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sts = sts_front::start(([127, 0, 0, 1], 0).into(), moto::shared().addr);
    let setup = Setup {
        sts: sts.url(),
        pods: vec![
            pod("127.0.0.1", "shop", "web-0", Some("web")),
            pod("127.0.0.2", "shop", "web-1", Some("web")),
            pod(RUNAWAY, "shop", "runaway", Some("runaway")),
        ],
        // Fewer connections in all than the runaway tries to hold: without a per-pod bound it
        // would take every one, and the others would wait in the accept queue.
        imds_extra: "max_connections = 64\nclient_max_connections = 16\n\
                     client_requests_per_second = 50.0\nclient_burst = 50\n"
            .into(),
        log_level: "info".into(),
        ..Setup::default()
    };
    let iamlet = Iamlet::start(dir.path(), &setup);
    let imds = iamlet.imds;

    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicUsize::new(0));
    let runaway: Vec<_> = (0..RUNAWAY_CONNECTIONS)
        .map(|_| tokio::spawn(hammer(ip(RUNAWAY), imds, stop.clone(), attempts.clone())))
        .collect();
    // The runaway is over its share before the others ask.
    support::eventually(
        "the runaway refused",
        std::time::Duration::from_secs(30),
        || async {
            iamlet
                .metric("iamlet_imds_fair_share_refusals_total{limit=\"rate\"}")
                .await
                > 0.0
        },
    )
    .await;

    // A real SDK, with its own 1 s timeouts, gets its pod's credentials and they work.
    let identity = rust_sdk::caller_identity(&format!("http://{imds}"), &moto::shared().url())
        .await
        .expect("the well-behaved pod's SDK got credentials");
    assert_eq!(
        identity,
        "arn:aws:sts::123456789012:assumed-role/web/shop.default"
    );
    // And another pod's requests, one after another, are each answered.
    for _ in 0..20 {
        let reply = get(ip("127.0.0.2"), imds, &format!("{CREDS}web"), None).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.json()["Code"], "Success");
    }

    stop.store(true, Ordering::Relaxed);
    let mut statuses = Vec::new();
    for task in runaway {
        statuses.extend(task.await.expect("runaway task"));
    }
    assert!(
        iamlet
            .metric("iamlet_imds_fair_share_refusals_total{limit=\"connections\"}")
            .await
            > 0.0,
        "the runaway never reached its connection bound"
    );
    // The runaway was served within its share and told to come back past it.
    assert!(statuses.contains(&200), "the runaway got nothing at all");
    assert!(statuses.contains(&503), "the runaway was never refused");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    // Past its rate, a clear answer that SDKs retry.
    let mut refused = None;
    for _ in 0..200 {
        let reply = get(ip(RUNAWAY), imds, &format!("{CREDS}runaway"), None).await;
        if reply.status == 503 {
            refused = Some(reply);
            break;
        }
    }
    let refused = refused.expect("a 503 within 200 back-to-back requests at 50/s");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(
        refused.body.contains("too many requests per second"),
        "{}",
        refused.body
    );
}
