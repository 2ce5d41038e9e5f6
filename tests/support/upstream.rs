//! A fake of the node's real IMDS, recording every request it gets. It holds the node's own
//! secrets (role credentials, user-data) so tests can prove pods never see them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hyper::Request;

use super::server;

pub const NODE_SECRET: &str = "NODE-SECRET-KEY-never-for-pods";
pub const USER_DATA: &str = "#!/bin/sh\necho node bootstrap secret";
/// A path the fake answers only after [`SLOW_DELAY`], for requests that must be in flight.
pub const SLOW_PATH: &str = "/latest/meta-data/ami-id";
pub const SLOW_DELAY: std::time::Duration = std::time::Duration::from_millis(1500);

#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

#[derive(Clone)]
pub struct FakeImds {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeImds {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

/// A fake node IMDS on a free loopback port.
pub fn start() -> FakeImds {
    start_at(([127, 0, 0, 1], 0).into())
}

/// A fake node IMDS on `bind` (in the calling thread's network namespace).
pub fn start_at(bind: SocketAddr) -> FakeImds {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let record = seen.clone();
    let addr = server::spawn(bind, move |request: Request<_>| {
        let path = request.uri().path().to_owned();
        let method = request.method().to_string();
        record.lock().expect("seen").push(Seen {
            method: method.clone(),
            path: path.clone(),
            headers: request
                .headers()
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
        });
        let has_token = request.headers().get("x-aws-ec2-metadata-token").is_some();
        let response = match (method.as_str(), path.as_str()) {
            ("PUT", "/latest/api/token") => server::reply(200, "text/plain", "node-upstream-token"),
            // The node's IMDS requires IMDSv2, as hardened nodes do.
            (_, _) if !has_token => server::reply(401, "text/plain", ""),
            (_, "/latest/meta-data/iam/info") => server::reply(
                200,
                "text/plain",
                r#"{"Code":"Success","InstanceProfileArn":"arn:aws:iam::210987654321:instance-profile/nodes","InstanceProfileId":"AIPANODE"}"#,
            ),
            (_, "/latest/meta-data/iam/security-credentials/node-role") => server::reply(
                200,
                "text/plain",
                format!(
                    r#"{{"Code":"Success","AccessKeyId":"ASIANODE","SecretAccessKey":"{NODE_SECRET}"}}"#
                ),
            ),
            (_, "/latest/user-data") => server::reply(200, "text/plain", USER_DATA),
            (_, "/latest/meta-data/placement/region") => {
                server::reply(200, "text/plain", "eu-west-1")
            }
            (_, path) => server::reply(200, "text/plain", format!("upstream:{path}")),
        };
        let slow = path == SLOW_PATH;
        async move {
            if slow {
                tokio::time::sleep(SLOW_DELAY).await;
            }
            response
        }
    });
    FakeImds { addr, seen }
}
