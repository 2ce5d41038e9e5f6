//! The real iamlet binary, started with a config file written for the test. It logs JSON at
//! `debug` to a file, which is where the test learns its bound addresses.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// One `[[pods.static]]` entry.
#[derive(Debug, Clone)]
pub struct StaticPod {
    pub ip: String,
    pub namespace: String,
    pub name: String,
    pub role: Option<String>,
    pub service_account: Option<String>,
}

pub fn pod(ip: &str, namespace: &str, name: &str, role: Option<&str>) -> StaticPod {
    StaticPod {
        ip: ip.to_owned(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        role: role.map(str::to_owned),
        service_account: None,
    }
}

/// What a test changes in iamlet's configuration.
#[derive(Debug, Clone)]
pub struct Setup {
    pub imds_listen: String,
    pub tokens: String,
    pub sts: String,
    pub upstream: String,
    /// Extra lines for the `[imds]` section.
    pub imds_extra: String,
    /// Extra sections, appended as they are.
    pub extra: String,
    pub pods: Vec<StaticPod>,
    /// `--log-level`: `debug` (one line per request) unless a test says otherwise.
    pub log_level: String,
    /// The network namespace to run iamlet in (this machine's when `None`).
    pub netns: Option<String>,
    /// `pods.source`: "static" (with `pods`) or "kubernetes".
    pub pods_source: String,
    /// Extra environment for iamlet (KUBECONFIG, NODE_NAME…).
    pub env: Vec<(String, String)>,
    /// `aws.base_role_arn`; empty to have iamlet derive it from the node's IMDS.
    pub base_role_arn: String,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            imds_listen: "127.0.0.1:0".to_owned(),
            tokens: "optional".to_owned(),
            sts: String::new(),
            upstream: "http://127.0.0.1:9".to_owned(),
            imds_extra: String::new(),
            extra: String::new(),
            pods: Vec::new(),
            log_level: "debug".to_owned(),
            netns: None,
            pods_source: "static".to_owned(),
            env: Vec::new(),
            base_role_arn: "arn:aws:iam::123456789012:role/".to_owned(),
        }
    }
}

impl Setup {
    pub fn toml(&self, key_file: &Path) -> String {
        let mut toml = format!(
            "[imds]\nlisten = \"{}\"\ntokens = \"{}\"\ntoken_key_file = \"{}\"\nupstream = \"{}\"\n{}\n\
             [admin]\nlisten = \"127.0.0.1:0\"\nstatus_socket = \"{}\"\n\n\
             [aws]\nregion = \"us-east-1\"\nsts_endpoint = \"{}\"\nbase_role_arn = \"{}\"\n\n\
             [pods]\nsource = \"{}\"\n\n{}\n",
            self.imds_listen,
            self.tokens,
            key_file.display(),
            self.upstream,
            self.imds_extra,
            key_file.with_file_name("status.sock").display(),
            self.sts,
            self.base_role_arn,
            self.pods_source,
            self.extra,
        );
        for pod in &self.pods {
            let _ = write!(
                toml,
                "[[pods.static]]\nip = \"{}\"\nnamespace = \"{}\"\nname = \"{}\"\n",
                pod.ip, pod.namespace, pod.name
            );
            if let Some(role) = &pod.role {
                let _ = writeln!(toml, "role = \"{role}\"");
            }
            if let Some(sa) = &pod.service_account {
                let _ = writeln!(toml, "service_account = \"{sa}\"");
            }
            toml.push('\n');
        }
        toml
    }
}

/// The command prefix that runs a program chrooted into an image's root filesystem `root`, with
/// /proc mounted there as a container runtime would (iptables-legacy-save reads its tables
/// from /proc/net). The mount lives in the mount namespace of the process that made it: run
/// it under `ip netns exec`, which gives every command one of its own.
pub fn in_root(root: &Path) -> [String; 4] {
    [
        "sh".into(),
        "-c".into(),
        r#"mount -t proc proc "$0/proc" && exec chroot "$0" "$@""#.into(),
        root.display().to_string(),
    ]
}

pub struct Iamlet {
    pub imds: SocketAddr,
    pub admin: SocketAddr,
    /// `iamlet server`'s gRPC address (unset for the agent).
    pub grpc: SocketAddr,
    /// The token front's address (unset unless it is enabled).
    pub container_credentials: SocketAddr,
    child: Option<Child>,
    log: PathBuf,
}

impl Iamlet {
    /// Starts iamlet with `setup`, its config, key and log kept in `dir`.
    pub fn start(dir: &Path, setup: &Setup) -> Iamlet {
        let config = dir.join("iamlet.toml");
        std::fs::write(&config, setup.toml(&dir.join("imds-token.key"))).expect("write config");
        Self::launch(
            "agent",
            setup.netns.as_deref(),
            None,
            &config,
            &dir.join("iamlet.log"),
            &["--log-level", &setup.log_level],
            &setup.env,
        )
    }

    /// Starts `iamlet server` with the config file `config` and `env`, logging JSON at debug
    /// to `log`.
    pub fn start_server(config: &Path, log: &Path, env: &[(String, String)]) -> Iamlet {
        Self::start_server_logging(config, log, "debug", env)
    }

    /// As [`Iamlet::start_server`], logging at `level` (benchmarks: `info`, no line per call).
    pub fn start_server_logging(
        config: &Path,
        log: &Path,
        level: &str,
        env: &[(String, String)],
    ) -> Iamlet {
        Self::launch(
            "server",
            None,
            None,
            config,
            log,
            &["--log-level", level],
            env,
        )
    }

    /// Starts `iamlet agent` with the config file `config` and nothing else: no AWS
    /// credentials, no KUBECONFIG or NODE_NAME in its environment (only PATH).
    pub fn start_bare(config: &Path, log: &Path) -> Iamlet {
        Self::spawn(
            Self::command("agent", None, None, config, &["--log-level", "debug"]),
            log,
        )
    }

    /// Starts the iamlet of a container image's root filesystem `root` (chroot), as its
    /// entrypoint would run, inside network namespace `netns`. The config goes to the image's
    /// /etc/iamlet/iamlet.toml, the token key to its /var/lib/iamlet; the log to `log`.
    pub fn start_in_image(root: &Path, netns: &str, setup: &Setup, log: &Path) -> Iamlet {
        std::fs::create_dir_all(root.join("etc/iamlet")).expect("etc/iamlet");
        std::fs::create_dir_all(root.join("var/lib/iamlet")).expect("var/lib/iamlet");
        let config = Path::new("/etc/iamlet/iamlet.toml");
        let key = Path::new("/var/lib/iamlet/imds-token.key");
        std::fs::write(root.join("etc/iamlet/iamlet.toml"), setup.toml(key)).expect("config");
        Self::launch(
            "agent",
            Some(netns),
            Some(root),
            config,
            log,
            &["--log-level", &setup.log_level],
            &setup.env,
        )
    }

    /// Starts iamlet with a config file and extra arguments (which must include
    /// `--log-level`), logging JSON to `log`.
    pub fn start_with(config: &Path, log: &Path, args: &[&str]) -> Iamlet {
        Self::launch("agent", None, None, config, log, args, &[])
    }

    /// Runs `iamlet COMMAND --config CONFIG`, inside network namespace `netns` when given
    /// (with `root`, the iamlet of that root filesystem, chrooted into it), with iamlet's own
    /// AWS credentials (moto accepts any) and `env`.
    fn launch(
        command_name: &str,
        netns: Option<&str>,
        root: Option<&Path>,
        config: &Path,
        log: &Path,
        args: &[&str],
        env: &[(String, String)],
    ) -> Iamlet {
        let mut command = Self::command(command_name, netns, root, config, args);
        command
            .env("AWS_ACCESS_KEY_ID", "AKIDNODEOWN")
            .env("AWS_SECRET_ACCESS_KEY", "node-own-secret")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .envs(env.iter().map(|(k, v)| (k, v)));
        Self::spawn(command, log)
    }

    /// `iamlet COMMAND --config CONFIG --log-format json ARGS`, with only PATH in its
    /// environment.
    fn command(
        command_name: &str,
        netns: Option<&str>,
        root: Option<&Path>,
        config: &Path,
        args: &[&str],
    ) -> Command {
        // `ip netns exec`, `sh -c 'exec …'` and `chroot` exec the program, so the child's pid
        // is iamlet's own.
        let mut program: Vec<std::ffi::OsString> = Vec::new();
        if let Some(ns) = netns {
            program.extend(["ip", "netns", "exec", ns].map(Into::into));
        }
        match root {
            Some(root) => {
                program.extend(in_root(root).map(Into::into));
                program.push("/usr/local/bin/iamlet".into());
            }
            None => program.push(env!("CARGO_BIN_EXE_iamlet").into()),
        }
        let mut command = Command::new(&program[0]);
        command
            .args(&program[1..])
            .args([command_name, "--config"])
            .arg(config)
            .args(["--log-format", "json"])
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        command
    }

    fn spawn(mut command: Command, log: &Path) -> Iamlet {
        let log_file = std::fs::File::create(log).expect("log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start iamlet");
        let mut iamlet = Iamlet {
            imds: ([0, 0, 0, 0], 0).into(),
            admin: ([0, 0, 0, 0], 0).into(),
            grpc: ([0, 0, 0, 0], 0).into(),
            container_credentials: ([0, 0, 0, 0], 0).into(),
            child: Some(child),
            log: log.to_owned(),
        };
        iamlet.wait_until_serving();
        iamlet
    }

    fn wait_until_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let log = self.log();
            if log.contains("iamlet is serving") {
                for line in log.lines() {
                    let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
                        continue;
                    };
                    let addr = event["addr"].as_str().and_then(|a| a.parse().ok());
                    match (event["key"].as_str(), addr) {
                        (Some("imds.listen"), Some(addr)) => self.imds = addr,
                        (Some("admin.listen"), Some(addr)) => self.admin = addr,
                        (Some("server.listen"), Some(addr)) => self.grpc = addr,
                        (Some("container_credentials.listen"), Some(addr)) => {
                            self.container_credentials = addr
                        }
                        _ => {}
                    }
                }
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("iamlet exited with {status} before serving:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("iamlet did not start serving within 30 s:\n{}", self.log());
    }

    /// Everything iamlet logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The IMDS address as a pod on another host would dial it.
    pub fn imds_port(&self) -> u16 {
        self.imds.port()
    }

    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .map(|c| c.id() as i32)
            .unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit (at most 20 s).
    pub fn stop(&mut self) -> ExitStatus {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let mut child = self.child.take().expect("running");
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "iamlet did not exit within 20 s of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process with SIGKILL (no drain, nothing cleaned up) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether `/readyz` answers 200.
    pub async fn ready(&self) -> bool {
        let reply = super::http::get(self.admin.ip(), self.admin, "/readyz", None).await;
        reply.status == 200
    }

    /// The value of a metric line (`name{labels}`) on the admin port, 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let reply = super::http::get(self.admin.ip(), self.admin, "/metrics", None).await;
        assert_eq!(reply.status, 200);
        iamlet::metrics::value_in(&reply.body, series)
    }
}

impl Drop for Iamlet {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
