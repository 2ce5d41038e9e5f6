//! The command-line contract other tools rely on: `--version`, `config check`, `health`, and
//! exit codes that tell a bad configuration (2) from a failure at run time (1).

mod support;

use std::process::{Command, Output};

use support::iamlet::{Iamlet, Setup};

fn iamlet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iamlet"))
        .args(args)
        .env_remove("NODE_NAME")
        .output()
        .expect("run iamlet")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn version_is_printed() {
    let out = iamlet(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("iamlet {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn config_check_accepts_the_shipped_files() {
    for file in ["config/iamlet.toml", "config/local.toml"] {
        let path = support::repo().join(file);
        let out = iamlet(&["config", "check", path.to_str().expect("path")]);
        assert!(out.status.success(), "{file}: {}", text(&out.stderr));
    }
}

#[test]
fn config_check_names_the_bad_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[credentials]\nsession_duration = \"1h\"\nrefresh_before = \"3h\"\n",
    )
    .expect("write");
    let out = iamlet(&["config", "check", path.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("credentials.refresh_before"),
        "{}",
        text(&out.stderr)
    );

    std::fs::write(&path, "[imds]\ntokens = \"always\"\n").expect("write");
    let out = iamlet(&["config", "check", path.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("imds.tokens") && stderr.contains("always"),
        "{stderr}"
    );
}

#[test]
fn agent_with_a_bad_flag_value_exits_2_naming_the_key() {
    let out = iamlet(&["agent", "--config", "/dev/null", "--log-format", "xml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("log.format"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn agent_that_cannot_bind_says_which_address_and_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("iamlet.toml");
    let setup = Setup {
        imds_listen: format!("127.0.0.1:{port}"),
        ..Setup::default()
    };
    std::fs::write(&config, setup.toml(&dir.path().join("key"))).expect("write");
    let out = iamlet(&["agent", "--config", config.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("127.0.0.1:{port}")) && stderr.contains("imds.listen"),
        "{stderr}"
    );
    // The cause is said once, not once per layer of the error chain.
    let said = stderr
        .lines()
        .filter(|line| line.starts_with("iamlet: "))
        .map(|line| line.matches("Address already in use").count())
        .sum::<usize>();
    assert_eq!(said, 1, "{stderr}");
}

#[test]
fn config_check_refuses_a_log_level_that_is_not_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("verbose.toml");
    // tracing would take "verbose" for a target name and silence every log line.
    std::fs::write(&path, "[log]\nlevel = \"verbose\"\n").expect("write");
    let out = iamlet(&["config", "check", path.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("log.level") && stderr.contains("\"verbose\" is not a level"),
        "{stderr}"
    );
    let out = iamlet(&["agent", "--config", "/dev/null", "--log-level", "verbose"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn config_check_quotes_the_allowed_values_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokens.toml");
    std::fs::write(&path, "[imds]\ntokens = \"always\"\n").expect("write");
    let out = iamlet(&["config", "check", path.to_str().expect("path")]);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("imds.tokens: unknown value `always`, expected `optional` or `required`"),
        "{stderr}"
    );
}

#[test]
fn config_check_of_a_shipped_overlay_says_which_variable_the_daemonset_sets() {
    let path = support::repo().join("deploy/overlays/standalone/iamlet.toml");
    let out = iamlet(&["config", "check", path.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("imds.listen") && stderr.contains("IAMLET_IMDS__LISTEN="),
        "{stderr}"
    );
}

#[test]
fn health_tells_by_its_exit_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let iamlet_process = Iamlet::start(dir.path(), &Setup::default());
    let config = dir.path().join("health.toml");
    std::fs::write(
        &config,
        format!("[admin]\nlisten = \"{}\"\n", iamlet_process.admin),
    )
    .expect("write");
    let config = config.to_str().expect("path");
    let out = iamlet(&["health", "--config", config]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = iamlet(&["health", "--config", config, "--ready"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let admin = iamlet_process.admin;
    drop(iamlet_process);
    let out = iamlet(&["health", "--config", config]);
    assert_eq!(out.status.code(), Some(1));
    // Nothing listens there any more: the message names the address it tried, and its key.
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&admin.to_string()) && stderr.contains("admin.listen"),
        "{stderr}"
    );
}

#[test]
fn agent_that_cannot_derive_the_base_role_arn_says_which_key_to_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("iamlet.toml");
    let setup = Setup {
        // Nothing answers there: the node's IMDS cannot be asked for the account.
        upstream: format!("http://127.0.0.1:{}", support::free_port()),
        base_role_arn: String::new(),
        ..Setup::default()
    };
    std::fs::write(&config, setup.toml(&dir.path().join("key"))).expect("write");
    let out = iamlet(&["agent", "--config", config.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("aws.base_role_arn"), "{stderr}");
}
