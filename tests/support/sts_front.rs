//! A front for moto's STS that counts AssumeRole calls per role and plays the parts moto
//! cannot: it refuses roles whose ARN contains `denied` (403 AccessDenied, as STS answers) and
//! answers roles containing `slow` or `stall` only after a delay. Everything else is passed to
//! moto as is. On demand it puts all of STS in trouble ([`Fault`]): 5xx, throttling, refusals,
//! dropped connections, slowness, and expired credentials of iamlet's own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::server;

/// How long a `slow` role's AssumeRole is held back.
pub const SLOW: Duration = Duration::from_millis(1500);
/// How long a `stall` role's AssumeRole is held back: longer than any test waits.
pub const STALL: Duration = Duration::from_secs(10);

/// Trouble the front can put STS in, for every AssumeRole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 503 ServiceUnavailable.
    ServerError,
    /// 400 Throttling, as STS answers when over its rate.
    Throttling,
    /// 403 AccessDenied: the role may not be assumed.
    AccessDenied,
    /// The connection is dropped with the request read and no answer sent.
    Reset,
    /// Answers, but only after [`SLOW`].
    Slow,
    /// 400 ExpiredToken: the caller's (iamlet's own) credentials have expired.
    ExpiredToken,
}

#[derive(Default)]
struct Record {
    calls: HashMap<String, usize>,
    /// (role ARN, access key id that signed the call) per AssumeRole call.
    signers: Vec<(String, String)>,
    /// (role ARN, access key id moto issued) per successful AssumeRole call.
    issued: Vec<(String, String)>,
    times: Vec<std::time::Instant>,
    forms: Vec<HashMap<String, String>>,
    fault: Option<Fault>,
}

#[derive(Clone)]
pub struct StsFront {
    pub addr: SocketAddr,
    record: Arc<Mutex<Record>>,
}

impl StsFront {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// AssumeRole calls seen for roles whose ARN ends with `/{role}`.
    pub fn assume_role_calls(&self, role: &str) -> usize {
        let record = self.record.lock().expect("record");
        record
            .calls
            .iter()
            .filter(|(arn, _)| arn.ends_with(&format!("/{role}")))
            .map(|(_, n)| n)
            .sum()
    }

    /// When each AssumeRole call arrived.
    pub fn call_times(&self) -> Vec<std::time::Instant> {
        self.record.lock().expect("record").times.clone()
    }

    /// The parameters of every AssumeRole call.
    pub fn forms(&self) -> Vec<HashMap<String, String>> {
        self.record.lock().expect("record").forms.clone()
    }

    /// (role ARN, access key id that signed the call), for every AssumeRole call.
    pub fn signers(&self) -> Vec<(String, String)> {
        self.record.lock().expect("record").signers.clone()
    }

    /// (role ARN, access key id issued), for every AssumeRole call that succeeded.
    pub fn issued(&self) -> Vec<(String, String)> {
        self.record.lock().expect("record").issued.clone()
    }

    /// Puts STS in trouble (or out of it, with `None`).
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.record.lock().expect("record").fault = fault;
    }
}

/// Starts a front for `moto` listening on `bind`.
pub fn start(bind: SocketAddr, moto: SocketAddr) -> StsFront {
    let record: Arc<Mutex<Record>> = Arc::default();
    let counted = record.clone();
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let addr = server::spawn(bind, move |request: Request<hyper::body::Incoming>| {
        let record = counted.clone();
        let client = client.clone();
        async move {
            let (mut parts, body) = request.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let form: HashMap<String, String> = url_decode_form(&body);
            let assume_role = form.get("Action").map(String::as_str) == Some("AssumeRole");
            let arn = form.get("RoleArn").cloned().unwrap_or_default();
            if assume_role {
                let signer = signer(&parts.headers);
                let fault = {
                    let mut record = record.lock().expect("record");
                    *record.calls.entry(arn.clone()).or_default() += 1;
                    record.signers.push((arn.clone(), signer));
                    record.times.push(std::time::Instant::now());
                    record.forms.push(form.clone());
                    record.fault
                };
                match fault {
                    Some(Fault::ServerError) => {
                        return sts_error(503, "ServiceUnavailable", "Service is unavailable");
                    }
                    Some(Fault::Throttling) => {
                        return sts_error(400, "Throttling", "Rate exceeded");
                    }
                    Some(Fault::AccessDenied) => return access_denied(&arn),
                    Some(Fault::ExpiredToken) => {
                        return sts_error(
                            400,
                            "ExpiredToken",
                            "The security token included in the request is expired",
                        );
                    }
                    Some(Fault::Reset) => {
                        // Ends the connection's task without an answer (and without the
                        // panic hook's noise): the client sees the connection close mid-call.
                        std::panic::resume_unwind(Box::new("connection reset by the STS front"));
                    }
                    Some(Fault::Slow) => tokio::time::sleep(SLOW).await,
                    None => {}
                }
                if arn.contains("denied") {
                    return access_denied(&arn);
                }
                if arn.contains("slow") {
                    tokio::time::sleep(SLOW).await;
                }
                if arn.contains("stall") {
                    tokio::time::sleep(STALL).await;
                }
            }
            let uri = format!(
                "http://{moto}{}",
                parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/")
            );
            parts.uri = uri.parse().expect("uri");
            let forwarded = Request::from_parts(parts, Full::new(body));
            match client.request(forwarded).await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    if assume_role && let Some(key) = issued_key(&body) {
                        record.lock().expect("record").issued.push((arn, key));
                    }
                    Response::from_parts(parts, Full::new(body))
                }
                Err(err) => server::reply(502, "text/plain", format!("moto: {err}")),
            }
        }
    });
    StsFront { addr, record }
}

fn sts_error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
         <Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>\
         <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ErrorResponse>"
    );
    server::reply(status, "text/xml", body)
}

fn access_denied(arn: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
         <Error><Type>Sender</Type><Code>AccessDenied</Code>\
         <Message>User: arn:aws:iam::123456789012:user/node is not authorized to perform: \
         sts:AssumeRole on resource: {arn}</Message></Error>\
         <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ErrorResponse>"
    );
    server::reply(403, "text/xml", body)
}

/// The access key id in a SigV4 `Authorization` header (`… Credential=AKID/date/…`).
fn signer(headers: &hyper::HeaderMap) -> String {
    headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split("Credential=").nth(1))
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
        .to_owned()
}

/// The `AccessKeyId` in an AssumeRole answer.
fn issued_key(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let start = text.find("<AccessKeyId>")? + "<AccessKeyId>".len();
    let end = text[start..].find("</AccessKeyId>")?;
    Some(text[start..start + end].to_owned())
}

/// `application/x-www-form-urlencoded` → map (the AWS query protocol STS speaks).
pub fn url_decode_form(body: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
