//! Unmodified AWS SDKs as pods. Each of boto3, the AWS CLI, the JavaScript SDK v3 and
//! aws-config (Rust) runs in its own network namespace with its own IP, finds iamlet through
//! `AWS_EC2_METADATA_SERVICE_ENDPOINT` alone, and asks moto's STS who it is: each must be its
//! own pod's assumed role. A pod without a role gets no credentials from any SDK.

mod support;

use std::path::PathBuf;

use aws_credential_types::provider::ProvideCredentials;
use support::iamlet::{Iamlet, Setup, pod};
use support::netns::PodNet;
use support::{moto, repo, rust_sdk};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Sdk {
    Boto3,
    AwsCli,
    JsV3,
    RustAwsConfig,
}

const ALL: [Sdk; 4] = [Sdk::Boto3, Sdk::AwsCli, Sdk::JsV3, Sdk::RustAwsConfig];

/// What a client run printed: the caller ARN on success, the error text otherwise.
type Outcome = Result<String, String>;

/// Runs `sdk` as the pod in `net`, with iamlet at `imds` and STS at `sts` (both host URLs).
fn caller_identity(sdk: Sdk, net: &PodNet, imds: &str, sts: &str) -> Outcome {
    let home = tempfile::tempdir().expect("home");
    let env = vec![
        ("HOME", home.path().display().to_string()),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.to_owned()),
        (
            "AWS_CONFIG_FILE",
            home.path().join("none").display().to_string(),
        ),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            home.path().join("none").display().to_string(),
        ),
    ];
    let output = match sdk {
        Sdk::Boto3 => {
            let script = repo().join("tests/sdk/boto3_identity.py");
            let script = script.display().to_string();
            net.run(&support::peer_program("python3"), &[&script, sts], &env)
        }
        Sdk::AwsCli => net.run(
            &support::peer_program("aws"),
            &[
                "sts",
                "get-caller-identity",
                "--endpoint-url",
                sts,
                "--region",
                "us-east-1",
                "--query",
                "Arn",
                "--output",
                "text",
            ],
            &env,
        ),
        Sdk::JsV3 => {
            let script = repo().join("tests/js/identity.mjs").display().to_string();
            net.run(&PathBuf::from("node"), &[&script, sts], &env)
        }
        Sdk::RustAwsConfig => {
            let (imds, sts) = (imds.to_owned(), sts.to_owned());
            return net.enter(move || rust_caller_identity(&imds, &sts));
        }
    };
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// aws-config's IMDS credentials provider, on a runtime of the calling thread.
fn rust_caller_identity(imds: &str, sts: &str) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(rust_sdk::caller_identity(imds, sts))
}

fn assumed(role: &str, session: &str) -> String {
    format!("arn:aws:sts::123456789012:assumed-role/{role}/{session}")
}

fn matrix(tokens: &str) {
    let moto = moto::shared();
    // One namespace per SDK with a role, and one without a role.
    let nets: Vec<PodNet> = (0..ALL.len() + 1).map(|_| PodNet::create()).collect();
    let roles = [
        ("web", "shop", "web-0"),
        ("worker", "shop", "worker-0"),
        ("web", "other", "api-0"),
        ("team/batch", "batch", "job-0"),
    ];
    let mut pods: Vec<_> = roles
        .iter()
        .zip(&nets)
        .map(|((role, ns, name), net)| pod(&net.ip.to_string(), ns, name, Some(role)))
        .collect();
    let no_role = nets.last().expect("a namespace");
    pods.push(pod(&no_role.ip.to_string(), "shop", "no-role", None));

    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup {
        imds_listen: "0.0.0.0:0".into(),
        tokens: tokens.into(),
        sts: moto.url(),
        pods,
        ..Setup::default()
    };
    let iamlet = Iamlet::start(dir.path(), &setup);
    let url = |net: &PodNet, port: u16| format!("http://{}:{port}", net.host_ip);

    let expected = [
        assumed("web", "shop.default"),
        assumed("worker", "shop.default"),
        assumed("web", "other.default"),
        assumed("batch", "batch.default"),
    ];
    let mut table = Vec::new();
    for ((sdk, net), want) in ALL.iter().zip(&nets).zip(&expected) {
        let got = caller_identity(
            *sdk,
            net,
            &url(net, iamlet.imds_port()),
            &url(net, moto.addr.port()),
        );
        table.push(format!("{tokens:8} {sdk:?} as {}: {got:?}", net.ip));
        assert_eq!(
            got.as_ref(),
            Ok(want),
            "{sdk:?} as its own pod, tokens {tokens}"
        );
    }
    for sdk in ALL {
        let got = caller_identity(
            sdk,
            no_role,
            &url(no_role, iamlet.imds_port()),
            &url(no_role, moto.addr.port()),
        );
        table.push(format!(
            "{tokens:8} {sdk:?} as the pod without a role: {}",
            if got.is_err() {
                "no credentials"
            } else {
                "CREDENTIALS"
            }
        ));
        assert!(
            got.is_err(),
            "{sdk:?} got credentials for a pod without a role: {got:?}"
        );
    }
    eprintln!("{}", table.join("\n"));
    // They failed because iamlet said no, not because they never reached it.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let refused = runtime
        .block_on(iamlet.metric("iamlet_imds_requests_total{route=\"role\",status=\"404\"}"));
    assert!(
        refused >= ALL.len() as f64,
        "only {refused} role lookups were refused"
    );
}

#[test]
fn every_sdk_gets_its_own_pods_role_with_tokens_optional() {
    require_netns!();
    matrix("optional");
}

#[test]
fn every_sdk_gets_its_own_pods_role_with_tokens_required() {
    require_netns!();
    matrix("required");
}

/// aws-sdk-rust keeps its IMDSv2 token for hours and resends it after a 401 rather than
/// asking for a new one, so iamlet's tokens must outlive an iamlet restart. Runs without root:
/// the pod is 127.0.0.1, this process itself.
#[test]
fn aws_config_keeps_working_across_an_iamlet_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = support::free_port();
    let setup = Setup {
        imds_listen: format!("127.0.0.1:{port}"),
        tokens: "required".into(),
        sts: moto::shared().url(),
        pods: vec![pod("127.0.0.1", "shop", "web-0", Some("web"))],
        ..Setup::default()
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let provider = rust_sdk::imds_provider(&format!("http://127.0.0.1:{port}"));

    let mut first = Iamlet::start(dir.path(), &setup);
    let before = runtime
        .block_on(provider.provide_credentials())
        .expect("credentials before the restart");
    assert!(first.stop().success());

    let second = Iamlet::start(dir.path(), &setup);
    let after = runtime
        .block_on(provider.provide_credentials())
        .expect("credentials after the restart");
    assert!(!after.access_key_id().is_empty());
    assert!(before.expiry().is_some() && after.expiry().is_some());
    // The new process served the credentials with the old process's token: it minted none.
    let metric = |series: &str| runtime.block_on(second.metric(series));
    assert_eq!(
        metric("iamlet_imds_requests_total{route=\"token\",status=\"200\"}"),
        0.0
    );
    assert_eq!(
        metric("iamlet_imds_requests_total{route=\"credentials\",status=\"200\"}"),
        1.0
    );
    assert_eq!(
        metric("iamlet_imds_requests_total{route=\"credentials\",status=\"401\"}"),
        0.0
    );
}
