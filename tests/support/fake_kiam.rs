//! A fake kiam server: the generated `KiamService` on tonic with mutual TLS (a client
//! certificate signed by the CA is required), answering from a script per pod IP and, like a
//! real kiam server, getting credentials from STS (moto) and wording an unknown pod as real
//! kiam servers do (`GetPodRole`: "pod not found"; `GetPodCredentials`: "no pod found"). It
//! records every call with the client certificate it came with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use iamlet::kiam::proto::kiam_service_server::{KiamService, KiamServiceServer};
use iamlet::kiam::proto::{
    Credentials, GetHealthRequest, GetPodCredentialsRequest, GetPodRoleRequest, HealthStatus, Role,
};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

/// What the server says of a pod IP.
#[derive(Debug, Clone)]
pub enum Answer {
    Role(String),
    Forbidden,
    /// An unknown pod until the instant, then the role.
    NoPodUntil(Instant, String),
    /// The role, but `GetPodCredentials` says "no pod found" until the instant (a server
    /// whose pod list lags, or a pod deleted between the two calls).
    NoCredentialsUntil(Instant, String),
}

#[derive(Debug, Clone)]
pub struct Call {
    pub method: &'static str,
    pub ip: String,
    pub client_cert: Option<Vec<u8>>,
}

#[derive(Clone, Default)]
pub struct Script {
    answers: Arc<Mutex<HashMap<String, Answer>>>,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Script {
    pub fn answer(&self, ip: &str, answer: Answer) {
        self.answers
            .lock()
            .expect("answers")
            .insert(ip.to_owned(), answer);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("calls").clone()
    }

    pub fn count(&self, method: &str) -> usize {
        self.calls().iter().filter(|c| c.method == method).count()
    }

    fn record<T>(&self, method: &'static str, ip: &str, request: &Request<T>) {
        let client_cert = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()));
        self.calls.lock().expect("calls").push(Call {
            method,
            ip: ip.to_owned(),
            client_cert,
        });
    }

    /// The role of the pod at `ip`, as `method` sees it.
    fn role(&self, method: &str, ip: &str) -> Result<String, Status> {
        let no_pod = || {
            Status::unknown(match method {
                "GetPodRole" => "pod not found",
                _ => "no pod found",
            })
        };
        match self.answers.lock().expect("answers").get(ip).cloned() {
            None => Err(no_pod()),
            Some(Answer::Role(role)) => Ok(role),
            Some(Answer::Forbidden) => Err(Status::unknown("forbidden by policy")),
            Some(Answer::NoPodUntil(until, _)) if Instant::now() < until => Err(no_pod()),
            Some(Answer::NoCredentialsUntil(until, _))
                if method == "GetPodCredentials" && Instant::now() < until =>
            {
                Err(no_pod())
            }
            Some(Answer::NoPodUntil(_, role) | Answer::NoCredentialsUntil(_, role)) => Ok(role),
        }
    }
}

struct Service {
    script: Script,
    sts: aws_sdk_sts::Client,
}

#[tonic::async_trait]
impl KiamService for Service {
    async fn get_pod_role(
        &self,
        request: Request<GetPodRoleRequest>,
    ) -> Result<Response<Role>, Status> {
        let ip = request.get_ref().ip.clone();
        self.script.record("GetPodRole", &ip, &request);
        Ok(Response::new(Role {
            name: self.script.role("GetPodRole", &ip)?,
        }))
    }

    async fn get_pod_credentials(
        &self,
        request: Request<GetPodCredentialsRequest>,
    ) -> Result<Response<Credentials>, Status> {
        let GetPodCredentialsRequest { ip, role } = request.get_ref().clone();
        self.script.record("GetPodCredentials", &ip, &request);
        if self.script.role("GetPodCredentials", &ip)? != role {
            return Err(Status::unknown("forbidden by policy"));
        }
        let assumed = self
            .sts
            .assume_role()
            .role_arn(format!("arn:aws:iam::123456789012:role/{role}"))
            .role_session_name("kiam-fake")
            .send()
            .await
            .map_err(|err| Status::internal(err.to_string()))?;
        let c = assumed
            .credentials
            .ok_or_else(|| Status::internal("no credentials"))?;
        let format = |time: SystemTime| {
            time::OffsetDateTime::from(time)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        };
        Ok(Response::new(Credentials {
            code: "Success".into(),
            r#type: "AWS-HMAC".into(),
            access_key_id: c.access_key_id,
            secret_access_key: c.secret_access_key,
            token: c.session_token,
            expiration: format(
                SystemTime::try_from(c.expiration).unwrap_or(SystemTime::UNIX_EPOCH),
            ),
            last_updated: format(super::wall_clock()),
        }))
    }

    async fn get_health(
        &self,
        request: Request<GetHealthRequest>,
    ) -> Result<Response<HealthStatus>, Status> {
        self.script.record("GetHealth", "", &request);
        Ok(Response::new(HealthStatus {
            message: "ok".into(),
        }))
    }
}

/// The server's TLS material: its certificate and key, and the CA its clients must chain to.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    pub client_ca_pem: String,
}

pub struct FakeKiam {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeKiam {
    /// Serves on `bind` (port 0 for any) on a thread of its own, until stopped or dropped.
    pub fn start(bind: SocketAddr, tls: &ServerTls, script: Script, sts_url: &str) -> FakeKiam {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = std::net::TcpListener::bind(bind).expect("bind kiam");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let tls_config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
            .client_ca_root(Certificate::from_pem(&tls.client_ca_pem));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let sts_url = sts_url.to_owned();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let config = aws_sdk_sts::config::Builder::new()
                    .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
                    .region(aws_sdk_sts::config::Region::new("us-east-1"))
                    .endpoint_url(sts_url)
                    .credentials_provider(aws_sdk_sts::config::Credentials::new(
                        "kiam", "kiam", None, None, "fake",
                    ))
                    .http_client(super::rust_sdk::http_client())
                    .build();
                let service = Service {
                    script,
                    sts: aws_sdk_sts::Client::from_conf(config),
                };
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let incoming = tokio_stream_incoming(listener);
                let _ = Server::builder()
                    .tls_config(tls_config)
                    .expect("tls")
                    .add_service(KiamServiceServer::new(service))
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        FakeKiam {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stops serving and waits until the port is free.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for FakeKiam {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Accepted connections as the stream tonic serves.
fn tokio_stream_incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}
