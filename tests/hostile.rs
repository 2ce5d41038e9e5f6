//! Hostile requests against the real binary, one table with a defined answer for each kind:
//! traversal and its encodings, case games, versioned paths, the node's secrets by every
//! spelling, oversized and malformed heads, slowloris, HTTP/1.0, pipelining, odd methods,
//! forwarding headers, odd `Host`, the node's own IP, and bad tokens. Bytes are written raw, so
//! nothing is normalised on the way. For every row: the defined status (or a close), no
//! credential for anyone not entitled, none of the node's secrets, and the node's IMDS never
//! asked for them. At the end iamlet still serves and never panicked.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::http::{self, ip};
use support::iamlet::{Iamlet, Setup, pod};
use support::{eventually, moto, sts_front, upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
const WEB: &str = "127.0.0.2";
const OTHER_POD: &str = "127.0.0.3";
const NO_ROLE: &str = "127.0.0.5";
/// The node's own address: no pod has it.
const NODE: &str = "127.0.0.1";
const IDLE: Duration = Duration::from_secs(2);

/// What a row must get back.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// One answer with this status.
    Status(u16),
    /// Answers with these statuses, in order (pipelining).
    Statuses(Vec<u16>),
    /// The connection is closed (or answered 408) without credentials.
    Closed,
}

struct Row {
    kind: String,
    from: &'static str,
    bytes: Vec<u8>,
    expect: Expect,
    /// Whether the answer may carry credentials: only the pod's own role, asked by the pod.
    entitled: bool,
    /// Write the bytes a few at a time, slowly (slowloris).
    trickle: bool,
}

fn get_from(from: &'static str, kind: &str, path: &str, expect: u16) -> Row {
    raw(
        from,
        kind,
        format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n"),
        expect,
    )
}

fn get(kind: &str, path: &str, expect: u16) -> Row {
    get_from(WEB, kind, path, expect)
}

fn raw(from: &'static str, kind: &str, text: impl Into<Vec<u8>>, expect: u16) -> Row {
    Row {
        kind: kind.to_owned(),
        from,
        bytes: text.into(),
        expect: Expect::Status(expect),
        entitled: false,
        trickle: false,
    }
}

fn with_headers(method: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut text =
        format!("{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    text
}

impl Row {
    fn entitled(mut self) -> Row {
        self.entitled = true;
        self
    }
}

/// Every hostile kind, with its answer. `tokens` holds the tokens the rows use.
fn table(tokens: &Tokens) -> Vec<Row> {
    let own = format!("{CREDS}web");
    let node_creds = format!("{CREDS}node-role");
    let long_name = format!("{CREDS}{}", "a".repeat(12_000));
    let mut rows = vec![
        // Baselines: the pod's own role, by the pod.
        get("own credentials", &own, 200).entitled(),
        get("own role name", CREDS, 200),
        get("own credentials with a query string", &format!("{own}?x=../../user-data"), 200)
            .entitled(),
        // Traversal and dot segments, plain and percent-encoded: never normalised, so never
        // another resource.
        get("dot-dot in the role name", &format!("{CREDS}../security-credentials/web"), 404),
        get("dot in the role name", &format!("{CREDS}./web"), 404),
        get("encoded dot-dot in the role name", &format!("{CREDS}%2e%2e/web"), 404),
        get("encoded slash in the role name", &format!("{CREDS}web%2f"), 404),
        get("encoded letter in the role name", &format!("{CREDS}we%62"), 404),
        get("encoded NUL in the role name", &format!("{CREDS}web%00"), 404),
        get("dot-dot to the node's role", "/latest/meta-data/placement/../iam/security-credentials/node-role", 404),
        get("encoded dot-dot to iam/info", "/latest/meta-data/placement/%2e%2e/iam/info", 404),
        get("upper-case encoded dot-dot", "/latest/meta-data/placement/%2E%2E/iam/info", 404),
        get("half-encoded dot-dot", "/latest/meta-data/placement/.%2e/iam/info", 404),
        get("double-encoded dot-dot", "/latest/meta-data/placement/%252e%252e/iam/info", 404),
        get("encoded traversal to user-data", "/latest/meta-data/placement/region%2f..%2f..%2fuser-data", 404),
        get("encoded slashes to the node's role", "/latest/meta-data%2fiam%2fsecurity-credentials%2fnode-role", 404),
        get("backslash traversal", "/latest/meta-data/placement/..\\..\\user-data", 404),
        get("dot-dot at the root", "/../latest/user-data", 404),
        // Double slashes.
        get("leading double slash", &format!("/{own}"), 404),
        get("double slash before meta-data", "/latest//meta-data/iam/security-credentials/", 404),
        get("double slash before iam", "/latest/meta-data//iam/info", 404),
        get("double slash before the role", &format!("{CREDS}/web"), 404),
        get("double slash after the role", &format!("{own}//"), 404),
        get("double slash to user-data", "/latest//user-data", 404),
        // Case games.
        get("upper-case LATEST", "/LATEST/meta-data/iam/security-credentials/web", 404),
        get("mixed-case meta-data", "/latest/Meta-Data/iam/security-credentials/web", 404),
        get("upper-case IAM to the node's role", "/latest/meta-data/IAM/security-credentials/node-role", 404),
        get("upper-case role name", &format!("{CREDS}WEB"), 404),
        get("mixed-case user-data", "/latest/User-Data", 404),
        get("upper-case API token path", "/latest/API/token", 404),
        // Versioned paths: only /latest is served; versions never reach the node's secrets.
        get("versioned credentials", "/2021-07-15/meta-data/iam/security-credentials/web", 404),
        get("versioned node role", "/2021-07-15/meta-data/iam/security-credentials/node-role", 404),
        get("versioned user-data", "/2021-07-15/user-data", 404),
        get("versioned iam/info", "/2009-04-04/meta-data/iam/info", 404),
        // The node's own secrets by other spellings.
        get("user-data", "/latest/user-data", 404),
        get("user-data with a trailing slash", "/latest/user-data/", 404),
        get("the node's role by name", &node_creds, 404),
        get("identity credentials", "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance", 404),
        get("identity credentials info", "/latest/meta-data/identity-credentials/ec2/info", 404),
        get("another pod's role", &format!("{CREDS}batch"), 404),
        // Sizes.
        get("a 12 KiB role name", &long_name, 404),
        raw(WEB, "a 20 KiB path", format!("GET /latest/meta-data/{} HTTP/1.1\r\nHost: x\r\n\r\n", "b".repeat(20_000)), 431),
        raw(WEB, "a 64 KiB header", with_headers("GET", &own, &[("X-Big", &"x".repeat(65_536))]), 431),
        raw(WEB, "5000 headers", {
            let headers: Vec<(String, String)> =
                (0..5_000).map(|i| (format!("X-H{i}"), "v".to_owned())).collect();
            let refs: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            with_headers("GET", &own, &refs)
        }, 431),
        raw(WEB, "a 4000-character method", format!("{} {own} HTTP/1.1\r\nConnection: close\r\n\r\n", "G".repeat(4_000)), 405),
        // Protocol versions and framing.
        raw(WEB, "HTTP/1.0 own credentials", format!("GET {own} HTTP/1.0\r\n\r\n"), 200).entitled(),
        raw(NO_ROLE, "HTTP/1.0 from a pod without a role", format!("GET {own} HTTP/1.0\r\n\r\n"), 404),
        raw(WEB, "HTTP/0.9 request line", format!("GET {own}\r\n\r\n"), 400),
        raw(WEB, "HTTP/1.2", format!("GET {own} HTTP/1.2\r\nHost: x\r\n\r\n"), 400),
        raw(WEB, "a TLS ClientHello", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03".to_vec(), 400),
        raw(WEB, "a NUL in the path", b"GET /latest/meta-data/\x00 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 400),
        raw(WEB, "a raw 0xff byte in the path", b"GET /latest/\xff HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 400),
        raw(WEB, "a header without a colon", format!("GET {own} HTTP/1.1\r\nHost: x\r\nbroken header\r\n\r\n"), 400),
        raw(WEB, "an obs-folded header", format!("GET {own} HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  folded\r\n\r\n"), 400),
        raw(WEB, "chunked and Content-Length together", format!(
            "POST {own} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n"), 405),
        raw(WEB, "an unknown transfer coding", "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n", 400),
        raw(WEB, "a GET with a body", format!(
            "GET {own} HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world"), 200).entitled(),
        raw(WEB, "a fragment in the target (dropped)", format!("GET {own}#frag HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), 200).entitled(),
        raw(WEB, "absolute-form target", format!("GET http://169.254.169.254{own} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), 200).entitled(),
        raw(NO_ROLE, "absolute-form target from a pod without a role", format!("GET http://169.254.169.254{own} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), 404),
        raw(WEB, "absolute-form to another host's user-data", "GET http://evil.example/latest/user-data HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n", 404),
        raw(WEB, "asterisk-form", "OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
        raw(WEB, "CONNECT to the node's IMDS", "CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: 169.254.169.254:80\r\nConnection: close\r\n\r\n", 405),
        // Methods.
        raw(WEB, "POST credentials", with_headers("POST", &own, &[]), 405),
        raw(WEB, "DELETE credentials", with_headers("DELETE", &own, &[]), 405),
        raw(WEB, "PATCH the role name", with_headers("PATCH", CREDS, &[]), 405),
        raw(WEB, "TRACE credentials", with_headers("TRACE", &own, &[]), 405),
        raw(WEB, "lower-case get", with_headers("get", &own, &[]), 405),
        raw(WEB, "GET the token path", with_headers("GET", "/latest/api/token", &[]), 405),
        raw(WEB, "PUT the token path with a slash", with_headers("PUT", "/latest/api/token/", &[("X-aws-ec2-metadata-token-ttl-seconds", "60")]), 405),
        raw(WEB, "PUT credentials", with_headers("PUT", &own, &[]), 405),
        raw(WEB, "HEAD credentials", with_headers("HEAD", &own, &[]), 200),
        // Forwarding headers never change who the client is, and refuse token requests.
        raw(WEB, "GET with X-Forwarded-For", with_headers("GET", &own, &[("X-Forwarded-For", OTHER_POD)]), 200).entitled(),
        raw(NO_ROLE, "X-Forwarded-For claiming a pod with a role", with_headers("GET", &own, &[("X-Forwarded-For", WEB)]), 404),
        raw(NO_ROLE, "Forwarded claiming a pod with a role", with_headers("GET", &own, &[("Forwarded", &format!("for={WEB}"))]), 404),
        raw(NO_ROLE, "X-Real-IP claiming a pod with a role", with_headers("GET", &own, &[("X-Real-IP", WEB)]), 404),
        raw(WEB, "PUT token with X-Forwarded-For", with_headers("PUT", "/latest/api/token", &[("X-aws-ec2-metadata-token-ttl-seconds", "60"), ("X-Forwarded-For", WEB)]), 403),
        raw(WEB, "PUT token with an empty X-Forwarded-For", with_headers("PUT", "/latest/api/token", &[("X-aws-ec2-metadata-token-ttl-seconds", "60"), ("x-FORWARDED-for", "")]), 403),
        raw(WEB, "PUT token with Forwarded", with_headers("PUT", "/latest/api/token", &[("X-aws-ec2-metadata-token-ttl-seconds", "60"), ("Forwarded", "for=10.0.0.1")]), 403),
        // Host is not identity.
        raw(WEB, "odd Host", with_headers("GET", &own, &[]).replace("Host: 169.254.169.254", "Host: evil.example:31337"), 200).entitled(),
        raw(NO_ROLE, "odd Host from a pod without a role", with_headers("GET", &own, &[]).replace("Host: 169.254.169.254", "Host: 127.0.0.2"), 404),
        raw(WEB, "two Host headers", with_headers("GET", &own, &[("Host", "evil.example")]), 200).entitled(),
        raw(WEB, "no Host header", format!("GET {own} HTTP/1.1\r\nConnection: close\r\n\r\n"), 200).entitled(),
        // The node's own IP has no pod: nothing.
        get_from(NODE, "the node's IP asks for the role name", CREDS, 404),
        get_from(NODE, "the node's IP asks for the node's role", &node_creds, 404),
        get_from(NODE, "the node's IP asks for iam/info", "/latest/meta-data/iam/info", 404),
        get_from(NODE, "the node's IP asks for user-data", "/latest/user-data", 404),
        get_from(NODE, "the node's IP asks for a pod's role", &own, 404),
        get_from(NO_ROLE, "a pod without a role asks for one", &own, 404),
        // Tokens.
        raw(WEB, "a forged token", with_headers("GET", &own, &[("X-aws-ec2-metadata-token", "forged")]), 401),
        raw(WEB, "a 4000-character token", with_headers("GET", &own, &[("X-aws-ec2-metadata-token", &"A".repeat(4_000))]), 401),
        raw(WEB, "a token minted for another pod", with_headers("GET", &own, &[("X-aws-ec2-metadata-token", &tokens.other_pod)]), 401),
        raw(WEB, "a token from another node's key", with_headers("GET", &own, &[("X-aws-ec2-metadata-token", &tokens.other_key)]), 401),
        raw(WEB, "a tampered token", with_headers("GET", &own, &[("X-aws-ec2-metadata-token", &tokens.tampered)]), 401),
        raw(WEB, "an expired token", with_headers("GET", &own, &[("X-aws-ec2-metadata-token", &tokens.expired)]), 401),
        raw(WEB, "a token on a proxied path, minted elsewhere", with_headers("GET", "/latest/meta-data/placement/region", &[("X-aws-ec2-metadata-token", &tokens.other_pod)]), 401),
        raw(WEB, "a valid token", with_headers("GET", &own, &[("X-aws-ec2-metadata-token", &tokens.valid)]), 200).entitled(),
    ];
    // Absurd TTLs.
    for ttl in [
        "0",
        "21601",
        "-1",
        "+60",
        "60.0",
        "1e3",
        "0x3c",
        "99999999999999999999999",
        " ",
        "sixty",
    ] {
        rows.push(raw(
            WEB,
            &format!("token TTL {ttl:?}"),
            with_headers(
                "PUT",
                "/latest/api/token",
                &[("X-aws-ec2-metadata-token-ttl-seconds", ttl)],
            ),
            400,
        ));
    }
    rows.push(raw(
        WEB,
        "token TTL as two headers",
        with_headers(
            "PUT",
            "/latest/api/token",
            &[
                ("X-aws-ec2-metadata-token-ttl-seconds", "60"),
                ("X-aws-ec2-metadata-token-ttl-seconds", "0"),
            ],
        ),
        400,
    ));
    rows.push(raw(WEB, "token TTL with non-ASCII digits", "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-aws-ec2-metadata-token-ttl-seconds: \u{ff16}\u{ff10}\r\n\r\n", 400));
    // Pipelining: answered in order, each for the pod that sent it.
    let pipelined = |paths: &[&str]| {
        let mut text = String::new();
        for (i, path) in paths.iter().enumerate() {
            let close = if i + 1 == paths.len() {
                "Connection: close\r\n"
            } else {
                ""
            };
            text.push_str(&format!("GET {path} HTTP/1.1\r\nHost: x\r\n{close}\r\n"));
        }
        text
    };
    rows.push(
        Row {
            expect: Expect::Statuses(vec![200, 200, 404, 404]),
            ..raw(
                WEB,
                "pipelined: own role, own credentials, another role, user-data",
                pipelined(&[CREDS, &own, &format!("{CREDS}batch"), "/latest/user-data"]),
                0,
            )
        }
        .entitled(),
    );
    rows.push(Row {
        expect: Expect::Statuses(vec![404, 404]),
        ..raw(
            NO_ROLE,
            "pipelined from a pod without a role",
            pipelined(&[&own, &node_creds]),
            0,
        )
    });
    rows.push(Row {
        expect: Expect::Statuses(vec![200; 50]),
        ..raw(
            WEB,
            "50 pipelined role-name requests",
            pipelined(&[CREDS; 50]),
            0,
        )
    });
    // Slowloris: a head that never finishes is cut off after imds.idle_timeout.
    rows.push(Row {
        expect: Expect::Closed,
        trickle: true,
        ..raw(
            WEB,
            "slowloris head",
            format!("GET {own} HTTP/1.1\r\nHost: x\r\nX-Slow: "),
            0,
        )
    });
    rows.push(Row {
        expect: Expect::Closed,
        ..raw(WEB, "a connection that sends nothing", "", 0)
    });
    rows.push(Row {
        expect: Expect::Closed,
        ..raw(
            WEB,
            "an HTTP/2 preface on HTTP/1",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            0,
        )
    });
    rows.push(Row {
        expect: Expect::Closed,
        ..raw(
            WEB,
            "a half-sent head",
            format!("GET {own} HTTP/1.1\r\nHost: x\r\n"),
            0,
        )
    });
    rows
}

/// Tokens the table uses, minted before it runs.
struct Tokens {
    valid: String,
    other_pod: String,
    other_key: String,
    tampered: String,
    expired: String,
}

/// Sends a row's bytes from its address and reads until the server closes (or 20 s).
async fn exchange(row: &Row, to: SocketAddr) -> Vec<u8> {
    let mut stream = http::connect(ip(row.from), to).await;
    if row.trickle {
        for byte in &row.bytes {
            if stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            // Stop once the server hung up on us.
            let mut probe = [0u8; 1];
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_millis(1), stream.peek(&mut probe)).await
            {
                break;
            }
        }
    } else {
        let _ = stream.write_all(&row.bytes).await;
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "{}: no end to the answer within 20 s",
        row.kind
    );
    answer
}

/// The status of every response in `answer`, in order.
fn statuses(answer: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(answer);
    let mut found = Vec::new();
    let mut rest: &str = &text;
    while let Some(at) = rest.find("HTTP/1.") {
        let line = &rest[at..];
        if let Some(code) = line.get(9..12).and_then(|c| c.parse().ok()) {
            found.push(code);
        }
        rest = &line[8..];
    }
    found
}

fn start() -> (tempfile::TempDir, Iamlet, upstream::FakeImds) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sts = sts_front::start(([127, 0, 0, 1], 0).into(), moto::shared().addr);
    let node = upstream::start();
    let setup = Setup {
        sts: sts.url(),
        upstream: node.url(),
        pods: vec![
            pod(WEB, "shop", "web-0", Some("web")),
            pod(OTHER_POD, "batch", "job-0", Some("batch")),
            pod(NO_ROLE, "shop", "no-role", None),
        ],
        // Everything is admitted by the allow-list, so only iamlet's own rules stand between
        // the pods and the node's secrets.
        imds_extra: format!(
            "proxy_allow = [\".*\"]\nidle_timeout = \"{}s\"\n",
            IDLE.as_secs()
        ),
        ..Setup::default()
    };
    let iamlet = Iamlet::start(dir.path(), &setup);
    (dir, iamlet, node)
}

async fn mint(from: IpAddr, to: SocketAddr, ttl: &str) -> String {
    let reply = http::request(
        from,
        to,
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", ttl)],
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_their_defined_answers_and_nothing_else() {
    let (_dir, iamlet, node) = start();
    let imds = iamlet.imds;
    let own = format!("{CREDS}web");

    // The pod's own secret, which no one else may ever see.
    let own_doc = http::get(ip(WEB), imds, &own, None).await.json();
    let own_secret = own_doc["SecretAccessKey"]
        .as_str()
        .expect("secret")
        .to_owned();

    let valid = mint(ip(WEB), imds, "21600").await;
    let expired = mint(ip(WEB), imds, "1").await;
    eventually(
        "the one-second token expired",
        Duration::from_secs(10),
        || async { http::get(ip(WEB), imds, &own, Some(&expired)).await.status == 401 },
    )
    .await;
    let other_key = {
        let (_other_dir, other, _other_node) = start();
        mint(ip(WEB), other.imds, "21600").await
    };
    let tampered = {
        let mut chars: Vec<char> = valid.chars().collect();
        let last = chars.len() - 1;
        chars[last] = if chars[last] == 'A' { 'B' } else { 'A' };
        chars.into_iter().collect()
    };
    let tokens = Tokens {
        other_pod: mint(ip(OTHER_POD), imds, "21600").await,
        valid,
        other_key,
        tampered,
        expired,
    };

    let rows = table(&tokens);
    let mut wrong = Vec::new();
    for row in &rows {
        let answer = exchange(row, imds).await;
        let text = String::from_utf8_lossy(&answer);
        let got = statuses(&answer);
        let ok = match &row.expect {
            Expect::Status(status) => got == vec![*status],
            Expect::Statuses(list) => &got == list,
            Expect::Closed => got.is_empty() || got == vec![408],
        };
        if !ok {
            wrong.push(format!(
                "{}: want {:?}, got {got:?}: {:.300}",
                row.kind, row.expect, text
            ));
        }
        // No credentials for anyone not entitled, and never the node's secrets.
        if !row.entitled {
            assert!(
                !text.contains("SecretAccessKey"),
                "{}: credentials leaked:\n{text}",
                row.kind
            );
        }
        for secret in [
            upstream::NODE_SECRET,
            "ASIANODE",
            "bootstrap",
            "210987654321",
        ] {
            assert!(
                !text.contains(secret),
                "{}: the node's secret leaked:\n{text}",
                row.kind
            );
        }
        if row.from != WEB {
            assert!(
                !text.contains(&own_secret),
                "{}: web-0's secret leaked",
                row.kind
            );
        }
    }
    assert!(rows.len() >= 60, "only {} kinds", rows.len());
    eprintln!("{} hostile kinds tried", rows.len());
    assert!(
        wrong.is_empty(),
        "answers not as defined:\n{}",
        wrong.join("\n")
    );

    // The node's IMDS was never asked for a secret, whatever the spelling.
    for seen in node.seen() {
        let path = seen.path.to_ascii_lowercase();
        let upstream_token = seen.method == "PUT" && seen.path == "/latest/api/token";
        assert!(
            upstream_token
                || !["iam", "user-data", "identity-credentials", "api"]
                    .iter()
                    .any(|secret| path.split('/').any(|segment| segment == *secret)),
            "the node's IMDS was asked for {} {}",
            seen.method,
            seen.path
        );
        assert!(
            !path.contains(".."),
            "traversal reached the node's IMDS: {}",
            seen.path
        );
    }
    // Still serving, and no panic on the way.
    let reply = http::get(ip(WEB), imds, &own, None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["Code"], "Success");
    assert!(iamlet.ready().await);
    assert!(!iamlet.log().contains("panicked"), "{}", iamlet.log());
}
