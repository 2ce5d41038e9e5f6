//! iamlet gives each Kubernetes pod the AWS credentials of the IAM role named on the pod, and
//! nothing else. It runs once per node and impersonates the EC2 instance metadata service
//! (IMDS): an iptables rule sends pods' traffic for 169.254.169.254:80 to iamlet, which knows
//! the pod by its source IP.
//!
//! A credential request flows through:
//!
//! 1. [`imds`]: the pod-facing HTTP server (tokens, routes, the upstream proxy);
//! 2. [`broker`]: the one seam behind it: "which role has the pod at this IP?" and
//!    "credentials for this IP and role";
//! 3. [`pods`]: the pod behind an IP (the Kubernetes watch, or a static table), described by
//!    [`pod`];
//! 4. [`policy`]: annotation → role ARN, namespace policy, session name;
//! 5. [`credentials`]: the cache in front of STS `AssumeRole`.
//!
//! In server-backed mode ([`mode`]), 3 to 5 happen in `iamlet server` ([`kiam::server`]),
//! which the agent asks over mutual-TLS gRPC ([`kiam`]); the server runs the same stack
//! ([`broker::Local`]) for the whole cluster's pods.
//!
//! The token front, [`container_credentials`], knows pods by a projected service-account
//! token instead of their IP: it verifies the token on the node, finds the pod it is bound to
//! by uid in this node's index, and serves its role through the same [`broker::Local`] stack
//! (policy, session name, cache).
//!
//! [`iptables`] installs and keeps the rules that send pods (and, for the token front, the
//! node's own processes) to iamlet.
//!
//! Around them: [`config`] (the whole config tree), [`app`] (build, then run),
//! [`supervisor`] (background tasks, watched), [`admin`] and [`metrics`] (the admin port),
//! [`status`] (`iamlet status`, on a Unix socket),
//! [`telemetry`] (logs), [`http_server`] (the serving loop both listeners share), [`clock`]
//! (injected time).

pub mod admin;
pub mod app;
pub mod broker;
pub mod clock;
pub mod config;
pub mod container_credentials;
pub mod credentials;
pub mod http_server;
pub mod imds;
pub mod iptables;
pub mod kiam;
pub mod metrics;
pub mod mode;
pub mod pod;
pub mod pods;
pub mod policy;
pub mod status;
pub mod supervisor;
pub mod telemetry;

pub use app::App;
pub use config::Config;
