//! A fake STS for scale runs: it answers `AssumeRole` with the XML STS (and moto) answers, after
//! a set delay, and signs nothing. moto would do, but its Python process competes for the
//! machine's two cores with iamlet and the load, and its answer time is not set; here every
//! call takes the delay and little else. Each call is recorded: role, session name, when it
//! arrived, when its answer was sent, and the access key id it issued.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};

use crate::support;

/// One AssumeRole call.
#[derive(Debug, Clone)]
pub struct Call {
    pub role_arn: String,
    pub session_name: String,
    pub arrived: Instant,
    pub answered: Instant,
    pub access_key_id: String,
}

#[derive(Clone)]
pub struct FakeSts {
    pub addr: SocketAddr,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl FakeSts {
    /// Starts a fake STS that answers every call after `delay`.
    pub fn start(delay: Duration) -> FakeSts {
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let recorded = calls.clone();
        let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let addr = support::server::spawn(
            ([127, 0, 0, 1], 0).into(),
            move |request: Request<hyper::body::Incoming>| {
                let (calls, counter) = (recorded.clone(), counter.clone());
                async move {
                    let arrived = Instant::now();
                    let body = request
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let form = support::sts_front::url_decode_form(&body);
                    if form.get("Action").map(String::as_str) != Some("AssumeRole") {
                        return reply(400, "<ErrorResponse><Error><Code>InvalidAction</Code></Error></ErrorResponse>".into());
                    }
                    tokio::time::sleep(delay).await;
                    let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let role_arn = form.get("RoleArn").cloned().unwrap_or_default();
                    let session_name = form.get("RoleSessionName").cloned().unwrap_or_default();
                    let seconds: u64 = form
                        .get("DurationSeconds")
                        .and_then(|d| d.parse().ok())
                        .unwrap_or(3600);
                    let access_key_id = format!("ASIAFAKE{n:012}");
                    let body = answer(&role_arn, &session_name, &access_key_id, seconds);
                    calls.lock().expect("calls").push(Call {
                        role_arn,
                        session_name,
                        arrived,
                        answered: Instant::now(),
                        access_key_id,
                    });
                    reply(200, body)
                }
            },
        );
        FakeSts { addr, calls }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("calls").clone()
    }

    pub fn count(&self) -> usize {
        self.calls.lock().expect("calls").len()
    }
}

fn reply(status: u16, body: String) -> Response<Full<Bytes>> {
    support::server::reply(status, "text/xml", body)
}

/// The AssumeRole answer, as STS words it; expiry `seconds` from now, in whole seconds.
fn answer(role_arn: &str, session_name: &str, access_key_id: &str, seconds: u64) -> String {
    let expiration =
        time::OffsetDateTime::from(support::wall_clock() + Duration::from_secs(seconds))
            .replace_nanosecond(0)
            .expect("whole seconds")
            .format(&time::format_description::well_known::Rfc3339)
            .expect("rfc3339");
    let role_name = role_arn.rsplit('/').next().unwrap_or_default();
    format!(
        "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
         <AssumeRoleResult><Credentials>\
         <AccessKeyId>{access_key_id}</AccessKeyId>\
         <SecretAccessKey>fakeSecretAccessKey0123456789abcdefghijkl</SecretAccessKey>\
         <SessionToken>{}</SessionToken>\
         <Expiration>{expiration}</Expiration>\
         </Credentials><AssumedRoleUser>\
         <AssumedRoleId>AROAFAKE0000000000000:{session_name}</AssumedRoleId>\
         <Arn>arn:aws:sts::123456789012:assumed-role/{role_name}/{session_name}</Arn>\
         </AssumedRoleUser><PackedPolicySize>6</PackedPolicySize></AssumeRoleResult>\
         <ResponseMetadata><RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ResponseMetadata>\
         </AssumeRoleResponse>",
        // A session token is long (about 1 KB for a role session); iamlet keeps it per identity.
        "FQoGZXIvYXdzEFAKE".repeat(48),
    )
}
