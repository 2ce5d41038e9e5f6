//! Pods wired for iamlet's token front, on the real API server. A pod's spec carries the wiring
//! exactly as `amazon-eks-pod-identity-webhook` injects it (the two environment variables and a
//! projected service-account token volume with audience `iamlet`); [`project`] then does what
//! the kubelet does for that volume: it reads the pod's spec, asks TokenRequest for a token
//! bound to the pod with the volume's audience and lifetime, and writes it under a directory
//! standing for the container's root, where the pod's SDK reads it.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// The endpoint pods are given.
pub const FULL_URI: &str = "http://169.254.170.23/v1/credentials";
const MOUNT: &str = "/var/run/secrets/iamlet/serviceaccount";
const TOKEN_FILE_ENV: &str = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE";

/// A pod to create on the API server.
#[derive(Debug, Clone)]
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub node: &'a str,
    pub ip: &'a str,
    pub role: Option<&'a str>,
    pub service_account: &'a str,
    pub host_network: bool,
    /// With the token front's wiring in its spec.
    pub wired: bool,
}

/// Creates ServiceAccount `name` in `namespace` (no controller manager runs to make them).
pub async fn create_service_account(client: &kube::Client, namespace: &str, name: &str) {
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": name}})).expect("service account");
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &account)
        .await
        .expect("create service account");
}

/// Creates the pod and, as its kubelet would, reports it running at its IP. Returns its uid.
pub async fn run_pod(client: &kube::Client, spec: &PodSpec<'_>) -> String {
    let mut annotations = serde_json::Map::new();
    if let Some(role) = spec.role {
        annotations.insert("iam.amazonaws.com/role".into(), role.into());
    }
    let mut container = json!({"name": "app", "image": "app"});
    let mut pod_spec = json!({
        "nodeName": spec.node,
        "hostNetwork": spec.host_network,
        "serviceAccountName": spec.service_account,
    });
    if spec.wired {
        container["env"] = json!([
            {"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "value": FULL_URI},
            {"name": TOKEN_FILE_ENV, "value": format!("{MOUNT}/token")},
        ]);
        container["volumeMounts"] =
            json!([{"name": "iamlet-token", "mountPath": MOUNT, "readOnly": true}]);
        pod_spec["volumes"] = json!([{"name": "iamlet-token", "projected": {"sources": [
            {"serviceAccountToken": {"audience": "iamlet", "expirationSeconds": 3600, "path": "token"}}
        ]}}]);
    }
    pod_spec["containers"] = json!([container]);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": spec.name, "annotations": annotations},
        "spec": pod_spec,
    }))
    .expect("pod");
    let pods = Api::<Pod>::namespaced(client.clone(), spec.namespace);
    let created = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let status =
        json!({"status": {"phase": "Running", "podIP": spec.ip, "podIPs": [{"ip": spec.ip}]}});
    pods.patch_status(spec.name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("set pod status");
    created.metadata.uid.expect("uid")
}

/// A token for pod `pod` (of ServiceAccount `account`, with uid `uid`) and `audience`, bound
/// to the pod, from TokenRequest.
pub async fn mint(
    client: &kube::Client,
    namespace: &str,
    account: &str,
    pod: &str,
    uid: &str,
    audience: &str,
    seconds: i64,
) -> String {
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {
            "audiences": [audience],
            "expirationSeconds": seconds,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": uid},
        }
    }))
    .expect("token request");
    let answer = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .expect("TokenRequest");
    answer.status.and_then(|s| s.token).expect("a token")
}

/// What the kubelet does for pod `namespace/name`'s projected token volumes: mints each
/// token and writes it under `root` (the container's root directory). Returns the
/// container's environment, its token file path moved under `root` like the token.
pub async fn project(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    root: &Path,
) -> HashMap<String, String> {
    let pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .expect("get pod");
    let uid = pod.metadata.uid.clone().expect("uid");
    let spec = pod.spec.expect("spec");
    let account = spec.service_account_name.clone().expect("service account");
    let container = &spec.containers[0];
    for mount in container.volume_mounts.iter().flatten() {
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .expect("volume");
        let sources = volume
            .projected
            .iter()
            .flat_map(|p| p.sources.iter().flatten());
        for source in sources {
            let Some(token) = &source.service_account_token else {
                continue;
            };
            let audience = token.audience.as_deref().expect("audience");
            let seconds = token.expiration_seconds.unwrap_or(3600);
            let minted = mint(client, namespace, &account, name, &uid, audience, seconds).await;
            let path = root
                .join(mount.mount_path.trim_start_matches('/'))
                .join(&token.path);
            std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
            std::fs::write(&path, minted).expect("write token");
        }
    }
    container
        .env
        .iter()
        .flatten()
        .map(|var| {
            let value = var.value.clone().unwrap_or_default();
            let value = if var.name == TOKEN_FILE_ENV {
                root.join(value.trim_start_matches('/'))
                    .display()
                    .to_string()
            } else {
                value
            };
            (var.name.clone(), value)
        })
        .collect()
}

/// `token` with its claims changed by `edit` and signed again with `key` (PKCS#8 PEM).
pub fn resign(token: &str, key_pem: &str, edit: impl FnOnce(&mut Value)) -> String {
    let mut parts = token.split('.');
    let header = parts.next().expect("header");
    let mut claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(parts.next().expect("claims"))
            .expect("b64"),
    )
    .expect("claims");
    edit(&mut claims);
    let input = format!(
        "{header}.{}",
        URL_SAFE_NO_PAD.encode(claims.to_string().as_bytes())
    );
    let der: String = key_pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let key = ring::signature::RsaKeyPair::from_pkcs8(&STANDARD.decode(der).expect("pem"))
        .expect("PKCS#8 RSA key");
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut signature,
    )
    .expect("sign");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// A fresh RSA key (PKCS#8 PEM) that is not the cluster's.
pub fn new_rsa_key() -> String {
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl genpkey");
    String::from_utf8(out.stdout).expect("pem")
}
