//! The whole configuration tree. Layers, later ones winning: defaults < TOML file (`--config`)
//! < `IAMLET_*` environment variables (`__` between levels: `IAMLET_IMDS__LISTEN`) < CLI flags.
//! Each module owns its section; [`Config::validate`] names the key at fault.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Value};
use serde::{Deserialize, Serialize};

use crate::{
    admin, container_credentials, credentials, imds, iptables, kiam, pods, policy, telemetry,
};

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub imds: imds::Config,
    pub admin: admin::Config,
    pub aws: AwsConfig,
    pub pods: pods::Config,
    pub policy: policy::Config,
    pub credentials: credentials::Config,
    pub iptables: iptables::Config,
    pub kiam: kiam::Config,
    /// `iamlet server` only.
    pub server: kiam::server::Config,
    /// The token front.
    pub container_credentials: container_credentials::Config,
    pub log: telemetry::Config,
}

/// The `[aws]` section: how iamlet reaches STS with its own credentials.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsConfig {
    /// Region for STS; empty = the default chain (`AWS_REGION`, profile, the node's IMDS).
    pub region: String,
    /// STS endpoint URL; empty = the AWS default for the region.
    pub sts_endpoint: String,
    /// `arn:<partition>:iam::<account>:role/`, prefixed to role names that are not full ARNs;
    /// empty = derived at start-up from the node's IMDS `iam/info`.
    pub base_role_arn: String,
}

/// A configuration error, naming the key at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl fmt::Display) -> ConfigError {
        ConfigError {
            key: key.into(),
            message: message.to_string(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Settings given as CLI flags, as (dotted key, value) pairs: the last layer.
pub type Overrides = Vec<(&'static str, Value)>;

impl Config {
    /// Loads the layers from `file` (if any), the process environment and `overrides`, then
    /// validates. Touches nothing but the file.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Config, ConfigError> {
        Self::load_with_env(file, overrides, std::env::vars())
    }

    /// As [`Config::load`], with the environment given (for tests).
    pub fn load_with_env(
        file: Option<&Path>,
        overrides: Overrides,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            std::fs::metadata(file).map_err(|err| {
                ConfigError::new(
                    "",
                    format!("cannot read config file {}: {err}", file.display()),
                )
            })?;
            figment = figment.merge(Toml::file_exact(file));
        }
        let env: Vec<(String, String)> = env.into_iter().collect();
        let node_name = env
            .iter()
            .find(|(name, value)| name == "NODE_NAME" && !value.is_empty())
            .map(|(_, value)| value.clone());
        let env = env
            .into_iter()
            .filter_map(|(name, value)| {
                let key = name
                    .strip_prefix(ENV_PREFIX)?
                    .to_lowercase()
                    .replace("__", ".");
                // Parsed like figment's own `Env`: numbers and booleans as such, else text.
                let value = value.parse().unwrap_or_else(|_| value.into());
                Some((key, value))
            })
            .collect();
        figment = figment.merge(Layer::new(ENV_LAYER, env));
        let flags = overrides
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect();
        figment = figment.merge(Layer::new("command-line flags", flags));
        let mut config: Config = figment.extract().map_err(from_figment)?;
        if config.pods.node_name.is_empty() {
            config.pods.node_name = node_name.unwrap_or_default();
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot, naming the key at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_imds()?;
        // Port 0 asks the kernel for a free port: two of them never collide.
        if self.admin.listen == self.imds.listen && self.imds.listen.port() != 0 {
            return Err(ConfigError::new(
                "admin.listen",
                "must differ from imds.listen, where the interception rule sends pods",
            ));
        }
        if !self.aws.base_role_arn.is_empty() {
            policy::BaseRoleArn::parse(&self.aws.base_role_arn)
                .map_err(|err| ConfigError::new("aws.base_role_arn", err))?;
        }
        if !self.aws.sts_endpoint.is_empty() {
            let ok = self
                .aws
                .sts_endpoint
                .parse::<hyper::Uri>()
                .is_ok_and(|uri| {
                    matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some()
                });
            if !ok {
                return Err(ConfigError::new(
                    "aws.sts_endpoint",
                    format!("{:?} is not an http(s) URL", self.aws.sts_endpoint),
                ));
            }
        }
        self.validate_pods()?;
        self.validate_credentials()?;
        telemetry::filter(&self.log.level).map_err(|err| ConfigError::new("log.level", err))?;
        self.validate_iptables()?;
        self.validate_kiam()?;
        self.validate_server()?;
        self.validate_container_credentials()?;
        Ok(())
    }

    fn validate_container_credentials(&self) -> Result<(), ConfigError> {
        let front = &self.container_credentials;
        if front.audience.trim().is_empty() {
            return Err(ConfigError::new(
                "container_credentials.audience",
                "must not be empty",
            ));
        }
        if front.issuer.chars().any(char::is_whitespace) {
            return Err(ConfigError::new(
                "container_credentials.issuer",
                format!("{:?} is not an issuer (no spaces)", front.issuer),
            ));
        }
        positive(
            "container_credentials.jwks_refresh_interval",
            front.jwks_refresh_interval,
        )?;
        if front.token_cache_size == 0 {
            return Err(ConfigError::new(
                "container_credentials.token_cache_size",
                "must be at least 1",
            ));
        }
        if !front.enabled {
            return Ok(());
        }
        if self.kiam.enabled() || self.pods.source != pods::Source::Kubernetes {
            return Err(ConfigError::new(
                "container_credentials.enabled",
                "needs standalone mode (kiam.server empty) with pods.source = \"kubernetes\": \
                 tokens name pods by uid, and only this node's watch knows them",
            ));
        }
        for (key, other) in [
            ("imds.listen", self.imds.listen),
            ("admin.listen", self.admin.listen),
        ] {
            if front.listen == other && other.port() != 0 {
                return Err(ConfigError::new(
                    "container_credentials.listen",
                    format!("must differ from {key}"),
                ));
            }
        }
        let target = front.listen.ip();
        if self.iptables.enabled && (target.is_unspecified() || target.is_loopback()) {
            return Err(ConfigError::new(
                "container_credentials.listen",
                format!(
                    "{target} cannot be the DNAT target of the interception rule; with \
                     iptables.enabled, listen on an address pods are routed to, such as the \
                     node's IP. The shipped DaemonSet sets \
                     IAMLET_CONTAINER_CREDENTIALS__LISTEN=$(HOST_IP):8183; to check its \
                     iamlet.toml, set it too"
                ),
            ));
        }
        Ok(())
    }

    fn validate_server(&self) -> Result<(), ConfigError> {
        let server = &self.server;
        if !server.assume_role_arn.is_empty() {
            policy::RoleArn::parse(&server.assume_role_arn)
                .map_err(|err| ConfigError::new("server.assume_role_arn", err))?;
        }
        for (key, path) in [
            ("server.cert", &server.cert),
            ("server.key", &server.key),
            ("server.ca", &server.ca),
        ] {
            if path.as_os_str().is_empty() {
                return Err(ConfigError::new(
                    key,
                    "must not be empty (iamlet server requires mutual TLS)",
                ));
            }
        }
        positive("server.reload_interval", server.reload_interval)?;
        positive("server.handshake_timeout", server.handshake_timeout)
    }

    fn validate_imds(&self) -> Result<(), ConfigError> {
        let imds = &self.imds;
        imds::compile_allow_list(&imds.proxy_allow).map_err(|err| {
            // The error text names the entry (imds.proxy_allow[i]).
            ConfigError::new("", err)
        })?;
        imds::check_upstream(&imds.upstream)
            .map_err(|err| ConfigError::new("imds.upstream", err))?;
        positive("imds.request_timeout", imds.request_timeout)?;
        positive("imds.idle_timeout", imds.idle_timeout)?;
        if imds.max_connections == 0 {
            return Err(ConfigError::new(
                "imds.max_connections",
                "must be at least 1",
            ));
        }
        if imds.token_key_file.as_os_str().is_empty() {
            return Err(ConfigError::new("imds.token_key_file", "must not be empty"));
        }
        if let Some((key, problem)) = imds.fair_share_problem() {
            return Err(ConfigError::new(key, problem));
        }
        Ok(())
    }

    fn validate_kiam(&self) -> Result<(), ConfigError> {
        let kiam = &self.kiam;
        if !kiam.enabled() {
            return Ok(());
        }
        if kiam.host_port().is_none() {
            return Err(ConfigError::new(
                "kiam.server",
                format!("{:?} is not host:port", kiam.server),
            ));
        }
        for (key, path) in [
            ("kiam.cert", &kiam.cert),
            ("kiam.key", &kiam.key),
            ("kiam.ca", &kiam.ca),
        ] {
            if path.as_os_str().is_empty() {
                return Err(ConfigError::new(
                    key,
                    "must be set with kiam.server (mutual TLS)",
                ));
            }
        }
        positive("kiam.request_deadline", kiam.request_deadline)?;
        positive("kiam.resolve_interval", kiam.resolve_interval)?;
        positive("kiam.reload_interval", kiam.reload_interval)
    }

    fn validate_iptables(&self) -> Result<(), ConfigError> {
        let rules = &self.iptables;
        iptables::check_host_interface(&rules.host_interface)
            .map_err(|err| ConfigError::new("iptables.host_interface", err))?;
        positive("iptables.reconcile_interval", rules.reconcile_interval)?;
        let target = self.imds.listen.ip();
        if rules.enabled && (target.is_unspecified() || target.is_loopback()) {
            return Err(ConfigError::new(
                "imds.listen",
                format!(
                    "{target} cannot be the DNAT target of the interception rule; with \
                     iptables.enabled, listen on an address pods are routed to, such as the \
                     node's IP. The shipped DaemonSet sets IAMLET_IMDS__LISTEN=$(HOST_IP):8181; \
                     to check its iamlet.toml, set it too (IAMLET_IMDS__LISTEN=10.0.0.1:8181 \
                     iamlet config check FILE)"
                ),
            ));
        }
        Ok(())
    }

    fn validate_pods(&self) -> Result<(), ConfigError> {
        let check_base = policy::BaseRoleArn::parse("arn:aws:iam::000000000000:role/")
            .map_err(|err| ConfigError::new("", err))?;
        if !self.policy.default_role.is_empty() {
            policy::RoleArn::resolve(&self.policy.default_role, &check_base)
                .map_err(|err| ConfigError::new("policy.default_role", err))?;
        }
        if !self.pods.startup_taint.is_empty() {
            check_taint_key(&self.pods.startup_taint)
                .map_err(|err| ConfigError::new("pods.startup_taint", err))?;
            if self.pods.source != pods::Source::Kubernetes || self.kiam.enabled() {
                return Err(ConfigError::new(
                    "pods.startup_taint",
                    "needs pods.source = \"kubernetes\" in standalone mode (the agent removes the taint through the API, which server-backed agents cannot reach)",
                ));
            }
        }
        positive("pods.max_staleness", self.pods.max_staleness)?;
        if self.pods.source == pods::Source::Kubernetes {
            if self.pods.wait_for_pod >= self.imds.request_timeout {
                return Err(ConfigError::new(
                    "pods.wait_for_pod",
                    "must be shorter than imds.request_timeout (and best under the SDKs' 1s)",
                ));
            }
            // pods.node_name may still come from the node's environment: `App::build` checks.
            return Ok(());
        }
        let mut seen = HashMap::new();
        for (i, pod) in self.pods.static_pods.iter().enumerate() {
            let key = |field: &str| format!("pods.static[{i}].{field}");
            if pod.namespace.trim().is_empty() {
                return Err(ConfigError::new(key("namespace"), "must not be empty"));
            }
            if pod.name.trim().is_empty() {
                return Err(ConfigError::new(key("name"), "must not be empty"));
            }
            if let Some(role) = &pod.role {
                policy::RoleArn::resolve(role, &check_base)
                    .map_err(|err| ConfigError::new(key("role"), err))?;
            }
            if let Some(first) = seen.insert(pod.ip.to_canonical(), i) {
                return Err(ConfigError::new(
                    key("ip"),
                    format!("{} is already the address of pods.static[{first}]", pod.ip),
                ));
            }
        }
        Ok(())
    }

    fn validate_credentials(&self) -> Result<(), ConfigError> {
        let credentials = &self.credentials;
        let sts_min = Duration::from_secs(15 * 60);
        let sts_max = Duration::from_secs(12 * 3600);
        if !(sts_min..=sts_max).contains(&credentials.session_duration) {
            return Err(ConfigError::new(
                "credentials.session_duration",
                "must be from 15m to 12h (STS's range)",
            ));
        }
        if credentials.refresh_before >= credentials.session_duration {
            return Err(ConfigError::new(
                "credentials.refresh_before",
                "must be shorter than credentials.session_duration",
            ));
        }
        if !(credentials.sts_qps.is_finite() && credentials.sts_qps > 0.0) {
            return Err(ConfigError::new(
                "credentials.sts_qps",
                "must be a number above 0",
            ));
        }
        if credentials.sts_burst == 0 {
            return Err(ConfigError::new(
                "credentials.sts_burst",
                "must be at least 1",
            ));
        }
        policy::check_session_template(&credentials.session_name)
            .map_err(|err| ConfigError::new("credentials.session_name", err))
    }
}

/// A taint key, as Kubernetes checks it: an optional DNS-subdomain prefix and `/`, then a name
/// of up to 63 characters of `[A-Za-z0-9_.-]`, starting and ending alphanumeric.
fn check_taint_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let alnum_ends = |s: &str| {
        s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && alnum_ends(name)
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    let prefix_ok = prefix.is_none_or(|prefix| {
        !prefix.is_empty()
            && prefix.len() <= 253
            && prefix.split('.').all(|label| {
                !label.is_empty()
                    && alnum_ends(label)
                    && label
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    if name_ok && prefix_ok {
        Ok(())
    } else {
        Err(format!(
            "{key:?} is not a taint key (an optional DNS prefix and '/', then up to 63 of [A-Za-z0-9_.-])"
        ))
    }
}

const ENV_PREFIX: &str = "IAMLET_";
/// The name of the environment's layer, as errors from it say.
const ENV_LAYER: &str = "IAMLET_* environment variables";

/// A layer of (dotted key, value) settings with a name that errors can point to.
struct Layer {
    name: &'static str,
    settings: Vec<(String, Value)>,
}

impl Layer {
    fn new(name: &'static str, settings: Vec<(String, Value)>) -> Layer {
        Layer { name, settings }
    }
}

impl figment::Provider for Layer {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(self.name)
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (key, value) in &self.settings {
            insert_dotted(&mut root, key, value.clone());
        }
        Ok(figment::Profile::Default.collect(root))
    }
}

/// Inserts `value` at a dotted `key` ("imds.listen"), creating the tables on the way.
fn insert_dotted(dict: &mut Dict, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            dict.insert(key.to_owned(), value);
        }
        Some((head, rest)) => {
            let entry = dict
                .entry(head.to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert_dotted(inner, rest, value);
            }
        }
    }
}

fn positive(key: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        Err(ConfigError::new(key, "must be longer than zero"))
    } else {
        Ok(())
    }
}

/// Figment's errors, reduced to the first one, with its key and where the value came from.
fn from_figment(err: figment::Error) -> ConfigError {
    let source = err
        .metadata
        .as_ref()
        .map(|meta| match &meta.source {
            // The variable itself, as the operator wrote it (keys are its lowercased name).
            _ if meta.name == ENV_LAYER && !err.path.is_empty() => format!(
                " (from the environment variable {ENV_PREFIX}{})",
                err.path.join("__").to_uppercase()
            ),
            Some(source) => format!(" (from {} {source})", meta.name),
            None => format!(" (from {})", meta.name),
        })
        .unwrap_or_default();
    let key = if err.path.is_empty() {
        String::new()
    } else {
        err.path.join(".")
    };
    ConfigError::new(key, format!("{}{source}", describe(&err.kind)))
}

/// Figment's text for an error, except that unknown names list the known ones once quoted
/// (figment's own text quotes the list twice: ``expected ``a` or `b`` ``).
fn describe(kind: &figment::error::Kind) -> String {
    use figment::error::{Kind, OneOf};
    match kind {
        Kind::UnknownVariant(found, expected) => {
            format!("unknown value `{found}`, expected {}", OneOf(expected))
        }
        Kind::UnknownField(found, expected) => {
            format!("unknown key `{found}`, expected {}", OneOf(expected))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn repo_file(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name)
    }

    fn load(toml: &str, env: &[(&str, &str)], overrides: Overrides) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("iamlet.toml");
        std::fs::write(&path, toml).expect("write");
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
        Config::load_with_env(Some(&path), overrides, env)
    }

    #[test]
    fn annotated_file_is_exactly_the_defaults() {
        let path = repo_file("config/iamlet.toml");
        let documented = Config::load_with_env(Some(&path), Vec::new(), []).expect("valid");
        let mut defaults = Config::default();
        defaults.pods.node_name = documented.pods.node_name.clone();
        assert_eq!(documented, defaults);
    }

    #[test]
    fn local_profile_is_valid() {
        let config = Config::load_with_env(Some(&repo_file("config/local.toml")), Vec::new(), [])
            .expect("valid");
        assert_eq!(config.pods.source, pods::Source::Static);
        assert_eq!(config.pods.static_pods.len(), 3);
    }

    #[test]
    fn layers_win_in_order() {
        let toml = "[imds]\ntokens = \"optional\"\nlisten = \"127.0.0.1:7000\"\n";
        let config = load(toml, &[], Vec::new()).expect("valid");
        assert_eq!(config.imds.listen.port(), 7000);

        let env = [
            ("IAMLET_IMDS__TOKENS", "required"),
            ("IAMLET_IMDS__LISTEN", "127.0.0.1:7001"),
        ];
        let config = load(toml, &env, Vec::new()).expect("valid");
        assert_eq!(config.imds.tokens, imds::TokenPolicy::Required);
        assert_eq!(config.imds.listen.port(), 7001);

        let flags: Overrides = vec![("imds.listen", "127.0.0.1:7002".into())];
        let config = load(toml, &env, flags).expect("valid");
        assert_eq!(config.imds.listen.port(), 7002);
        assert_eq!(config.imds.tokens, imds::TokenPolicy::Required);
    }

    #[test]
    fn environment_durations_and_numbers_parse() {
        let env = [
            ("IAMLET_CREDENTIALS__SESSION_DURATION", "2h"),
            ("IAMLET_IMDS__MAX_CONNECTIONS", "10"),
        ];
        let config = load("", &env, Vec::new()).expect("valid");
        assert_eq!(
            config.credentials.session_duration,
            Duration::from_secs(7200)
        );
        assert_eq!(config.imds.max_connections, 10);
    }

    #[test]
    fn errors_from_the_environment_name_the_variable() {
        for (name, value) in [
            ("IAMLET_IMDS__TOKNES", "required"),
            ("IAMLET_IMDS__TOKENS", "sometimes"),
        ] {
            let err = load("", &[(name, value)], Vec::new()).expect_err("invalid");
            assert!(
                err.to_string()
                    .contains(&format!("environment variable {name}")),
                "{err}"
            );
        }
    }

    fn key_of(result: Result<Config, ConfigError>) -> String {
        result.expect_err("invalid").key
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("[imds]\ntokens = \"sometimes\"", "imds.tokens"),
            ("[imds]\nlisten = \"nowhere\"", "imds.listen"),
            ("[imds]\nlistne = \"127.0.0.1:1\"", "imds.listne"),
            ("[imds]\nupstream = \"ftp://x\"", "imds.upstream"),
            ("[imds]\nrequest_timeout = \"soon\"", "imds.request_timeout"),
            ("[admin]\nlisten = \"127.0.0.1:8181\"", "admin.listen"),
            (
                "[aws]\nbase_role_arn = \"arn:aws:iam::1:role\"",
                "aws.base_role_arn",
            ),
            ("[aws]\nsts_endpoint = \"localhost\"", "aws.sts_endpoint"),
            (
                "[credentials]\nsession_duration = \"5m\"",
                "credentials.session_duration",
            ),
            (
                "[credentials]\nrefresh_before = \"2h\"",
                "credentials.refresh_before",
            ),
            (
                "[credentials]\nsession_name = \"{node}\"",
                "credentials.session_name",
            ),
            ("[log]\nformat = \"xml\"", "log.format"),
            ("[kiam]\nserver = \"kiam\"", "kiam.server"),
            ("[kiam]\nserver = \"kiam:443\"", "kiam.cert"),
            (
                "[server]\nassume_role_arn = \"kiam-server\"",
                "server.assume_role_arn",
            ),
            ("[server]\nca = \"\"", "server.ca"),
            ("[server]\nlisten = \"9610\"", "server.listen"),
            (
                "[iptables]\nhost_interface = \"eth0 eth1\"",
                "iptables.host_interface",
            ),
            ("[iptables]\nenabled = true", "imds.listen"),
            (
                "[container_credentials]\naudience = \" \"",
                "container_credentials.audience",
            ),
            (
                "[container_credentials]\njwks_refresh_interval = \"0s\"",
                "container_credentials.jwks_refresh_interval",
            ),
            (
                "[container_credentials]\ntoken_cache_size = 0",
                "container_credentials.token_cache_size",
            ),
            (
                "[container_credentials]\nenabled = true\n[kiam]\nserver = \"kiam:443\"\ncert = \"c\"\nkey = \"k\"\nca = \"a\"",
                "container_credentials.enabled",
            ),
            (
                "[container_credentials]\nenabled = true\n[pods]\nsource = \"static\"",
                "container_credentials.enabled",
            ),
            (
                "[container_credentials]\nenabled = true\nlisten = \"127.0.0.1:8181\"",
                "container_credentials.listen",
            ),
            (
                "[container_credentials]\nenabled = true\n[imds]\nlisten = \"10.0.0.1:8181\"\n[iptables]\nenabled = true",
                "container_credentials.listen",
            ),
            ("[pods]\nstartup_taint = \"not ok/\"", "pods.startup_taint"),
            (
                "[pods]\nsource = \"static\"\nstartup_taint = \"iamlet.io/not-ready\"",
                "pods.startup_taint",
            ),
            ("[pods]\nmax_staleness = \"0s\"", "pods.max_staleness"),
        ];
        for (toml, key) in cases {
            assert_eq!(&key_of(load(toml, &[], Vec::new())), key, "{toml}");
        }
        let env = [("IAMLET_IMDS__TOKENS", "sometimes")];
        assert_eq!(key_of(load("", &env, Vec::new())), "imds.tokens");
    }

    #[test]
    fn the_token_front_runs_in_standalone_mode_on_kubernetes() {
        let toml = "[container_credentials]\nenabled = true\nlisten = \"10.0.0.1:8183\"\n\
                    [imds]\nlisten = \"10.0.0.1:8181\"\n[iptables]\nenabled = true\n";
        let config = load(toml, &[], Vec::new()).expect("valid");
        assert!(config.container_credentials.enabled);
        assert_eq!(config.container_credentials.audience, "iamlet");
    }

    #[test]
    fn unknown_names_list_the_known_ones_quoted_once() {
        let err = load("[imds]\ntokens = \"always\"", &[], Vec::new()).expect_err("bad");
        assert!(
            err.message
                .starts_with("unknown value `always`, expected `optional` or `required` (from"),
            "{err}"
        );
        let err = load("[imds]\nlistne = \"127.0.0.1:1\"", &[], Vec::new()).expect_err("bad");
        assert!(
            err.message
                .starts_with("unknown key `listne`, expected one of `listen`, "),
            "{err}"
        );
        assert!(!err.message.contains("``"), "{err}");
    }

    #[test]
    fn sts_limits_must_allow_calls() {
        for (toml, key) in [
            ("[credentials]\nsts_qps = 0", "credentials.sts_qps"),
            ("[credentials]\nsts_qps = -1.5", "credentials.sts_qps"),
            ("[credentials]\nsts_burst = 0", "credentials.sts_burst"),
            (
                "[imds]\nclient_max_connections = 0",
                "imds.client_max_connections",
            ),
            (
                "[imds]\nclient_max_requests = 0",
                "imds.client_max_requests",
            ),
            (
                "[imds]\nclient_requests_per_second = 0",
                "imds.client_requests_per_second",
            ),
            ("[imds]\nclient_burst = 0", "imds.client_burst"),
        ] {
            assert_eq!(key_of(load(toml, &[], Vec::new())), key, "{toml}");
        }
    }

    #[test]
    fn bad_allow_list_entry_is_named() {
        let err = load("[imds]\nproxy_allow = [\"ok\", \"(\"]", &[], Vec::new()).expect_err("bad");
        assert!(err.to_string().contains("imds.proxy_allow[1]"), "{err}");
    }

    #[test]
    fn static_table_errors_name_the_entry() {
        let pods = |entries: &str| format!("[pods]\nsource = \"static\"\n{entries}");
        let dup = "[[pods.static]]\nip = \"10.0.0.1\"\nnamespace = \"a\"\nname = \"x\"\n\
                   [[pods.static]]\nip = \"10.0.0.1\"\nnamespace = \"a\"\nname = \"y\"\n";
        assert_eq!(
            key_of(load(&pods(dup), &[], Vec::new())),
            "pods.static[1].ip"
        );
        let bad_role =
            "[[pods.static]]\nip = \"10.0.0.1\"\nnamespace = \"a\"\nname = \"x\"\nrole = \"a b\"\n";
        assert_eq!(
            key_of(load(&pods(bad_role), &[], Vec::new())),
            "pods.static[0].role"
        );
        let no_name = "[[pods.static]]\nip = \"10.0.0.1\"\nnamespace = \"a\"\nname = \"\"\n";
        assert_eq!(
            key_of(load(&pods(no_name), &[], Vec::new())),
            "pods.static[0].name"
        );
    }

    #[test]
    fn missing_file_is_an_error() {
        let err =
            Config::load_with_env(Some(Path::new("/nonexistent/iamlet.toml")), Vec::new(), [])
                .expect_err("missing");
        assert!(err.message.contains("/nonexistent/iamlet.toml"), "{err}");
    }
}
