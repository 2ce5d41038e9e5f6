//! The fuzz targets' properties, shared by the libFuzzer binaries (`fuzz/fuzz_targets/`, run by
//! `fuzz/run.sh`) and the quick pass over the kept corpus in the normal test suite
//! (`tests/fuzz_corpus.rs`). Each takes arbitrary bytes and panics when a property fails; they
//! check what must hold, not only that nothing panics.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use iamlet::container_credentials::jwt::{self, Expected, KeySet};
use iamlet::imds::{DEFAULT_ALLOW, Metadata, Route, TokenKey, Upstream};
use iamlet::policy::{BaseRoleArn, NamespacePolicy, RoleArn};

/// A target: arbitrary bytes in, a panic when a property fails.
pub type Target = fn(&[u8]);

/// The targets, by name (the corpus directory and binary of each).
pub const TARGETS: &[(&str, Target)] = &[
    ("route", route),
    ("token", token),
    ("role_arn", role_arn),
    ("namespace_policy", namespace_policy),
    ("jwt", service_account_token),
];

const CREDENTIALS_PREFIX: &str = "/latest/meta-data/iam/security-credentials";
const NEVER: &[&str] = &["iam", "identity-credentials", "user-data", "api"];

fn upstreams() -> &'static (Upstream, Upstream) {
    static UPSTREAMS: OnceLock<(Upstream, Upstream)> = OnceLock::new();
    UPSTREAMS.get_or_init(|| {
        let timeout = Duration::from_secs(1);
        let everything = Upstream::new("http://127.0.0.1:9", &[".*".to_owned()], timeout);
        let default: Vec<String> = DEFAULT_ALLOW.iter().map(|p| (*p).to_owned()).collect();
        let default = Upstream::new("http://127.0.0.1:9", &default, timeout);
        (
            everything.expect("allow-all upstream"),
            default.expect("default upstream"),
        )
    })
}

/// Request routing and the proxy's path admission: only exact paths reach the pod-facing
/// routes, and nothing that could be the node's secret, or traverse to one, is ever proxied,
/// whatever the allow-list says.
pub fn route(data: &[u8]) {
    let path = String::from_utf8_lossy(data);
    let path = path.as_ref();
    match Route::of(path) {
        Route::Token => assert_eq!(path, "/latest/api/token"),
        Route::Metadata(Metadata::Credentials(name)) => {
            let rest = path
                .strip_prefix(CREDENTIALS_PREFIX)
                .and_then(|rest| rest.strip_prefix('/'))
                .expect("a credentials route under the prefix");
            assert!(
                rest == name || rest.strip_suffix('/') == Some(name),
                "{path:?}"
            );
        }
        Route::Metadata(Metadata::RoleName) => {
            assert!(path == CREDENTIALS_PREFIX || path == format!("{CREDENTIALS_PREFIX}/"));
        }
        Route::Metadata(Metadata::Upstream(proxied)) => assert_eq!(proxied, path),
        Route::Metadata(Metadata::Iam | Metadata::Info) => {
            assert!(path.starts_with("/latest/meta-data/iam"), "{path:?}");
        }
    }
    let (everything, default) = upstreams();
    let admitted = everything.admits(path);
    if default.admits(path) {
        assert!(
            admitted,
            "the default list admits {path:?} but allow-all does not"
        );
    }
    if admitted {
        let rest = path.strip_prefix('/').expect("absolute");
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        for segment in rest.split('/') {
            assert!(!segment.is_empty(), "empty segment proxied: {path:?}");
            assert!(
                segment != "." && segment != "..",
                "dot segment proxied: {path:?}"
            );
            assert!(
                segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
                "escape or odd byte proxied: {path:?}"
            );
            assert!(
                !NEVER
                    .iter()
                    .any(|never| never.eq_ignore_ascii_case(segment)),
                "a secret proxied: {path:?}"
            );
        }
    }
}

/// Token verification: nothing but a token minted by this key for this IP, unexpired, passes.
pub fn token(data: &[u8]) {
    static KEY: OnceLock<TokenKey> = OnceLock::new();
    let key = KEY.get_or_init(TokenKey::random);
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let ip = IpAddr::V4([10, 0, 0, 7].into());
    // Arbitrary text is never a valid token, in any form.
    let text = String::from_utf8_lossy(data);
    assert!(
        !key.verify(&text, ip, now),
        "forged token accepted: {text:?}"
    );
    // A minted token is bound to its IP and its lifetime, for any IP, TTL and time.
    if data.len() >= 16 + 2 + 5 {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&data[..16]);
        let owner = IpAddr::V6(Ipv6Addr::from(octets)).to_canonical();
        let ttl = 1 + u64::from(u16::from_be_bytes([data[16], data[17]])) % 21_600;
        let mut seconds = [0u8; 8];
        seconds[3..].copy_from_slice(&data[18..23]);
        let minted_at = UNIX_EPOCH + Duration::from_secs(u64::from_be_bytes(seconds));
        let minted = key.mint(owner, Duration::from_secs(ttl), minted_at);
        assert!(key.verify(&minted, owner, minted_at));
        assert!(key.verify(&minted, owner, minted_at + Duration::from_secs(ttl - 1)));
        assert!(!key.verify(&minted, owner, minted_at + Duration::from_secs(ttl)));
        let mut other = octets;
        other[15] ^= 1;
        let other = IpAddr::V6(Ipv6Addr::from(other)).to_canonical();
        assert!(
            !key.verify(&minted, other, minted_at),
            "a token for {owner} passed from {other}"
        );
        assert!(!TokenKey::random().verify(&minted, owner, minted_at));
    }
}

/// ARN and annotation parsing: a parsed role ARN is what was given and names a role; a
/// relative annotation never leaves the base's account and partition.
pub fn role_arn(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (annotation, base) = text.split_once('\n').unwrap_or((&text, ""));
    if let Ok(arn) = RoleArn::parse(annotation) {
        assert_eq!(arn.as_str(), annotation);
        assert!(!arn.name().is_empty() && !arn.name().contains('/'));
        assert!(arn.as_str().starts_with("arn:") && arn.as_str().contains(":iam::"));
        assert!(arn.instance_profile_arn().contains(":instance-profile/"));
    }
    let base = BaseRoleArn::parse(base)
        .unwrap_or_else(|_| BaseRoleArn::parse("arn:aws:iam::123456789012:role/").expect("base"));
    assert!(base.as_str().ends_with('/') && base.as_str().contains(":role/"));
    if let Ok(resolved) = RoleArn::resolve(annotation, &base) {
        assert!(RoleArn::parse(resolved.as_str()).is_ok(), "{resolved}");
        if !annotation.trim().starts_with("arn:") {
            assert!(
                resolved.as_str().starts_with(base.as_str()),
                "{annotation:?} left the base {}: {resolved}",
                base.as_str()
            );
        }
    }
    if let Ok(from_profile) = BaseRoleArn::from_instance_profile(annotation) {
        assert!(from_profile.as_str().ends_with(":role/"));
    }
}

/// The namespace policy regex: the annotation is anchored as a whole (no pattern can close
/// the anchoring group and permit more than it says), and a literal permits only itself.
pub fn namespace_policy(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (pattern, role) = text.split_once('\n').unwrap_or((&text, ""));
    if pattern.len() > 512 {
        return; // compile time of huge patterns is the regex crate's business, bounded there
    }
    let policy = NamespacePolicy::from_annotation(Some(pattern));
    if matches!(policy, NamespacePolicy::Permits(_)) {
        assert!(
            regex::Regex::new(pattern).is_ok(),
            "{pattern:?} is not a regex on its own, yet it was accepted once anchored"
        );
    }
    let Ok(role) = RoleArn::parse(role) else {
        return;
    };
    let decided = policy.decide("ns", &role, false);
    let literal = pattern
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b":/_-@=,".contains(&b));
    if literal {
        assert_eq!(
            decided.is_ok(),
            role.as_str() == pattern,
            "literal {pattern:?} and role {role}"
        );
    }
    if decided.is_ok() {
        let whole = regex::Regex::new(&format!(r"\A(?:{pattern})\z")).expect("compiles");
        assert!(
            whole.is_match(role.as_str()),
            "{pattern:?} permitted {role}"
        );
    }
}

/// A cluster's key set and a token it signed for a pod (valid at the returned time), made once
/// from the unit tests' RSA key.
fn cluster() -> &'static (KeySet, String, std::time::SystemTime) {
    static CLUSTER: OnceLock<(KeySet, String, std::time::SystemTime)> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        use base64::Engine;
        use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair, RsaPublicKeyComponents};
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let key = RsaKeyPair::from_pkcs8(include_bytes!(
            "../src/container_credentials/testdata/rsa-cluster.pk8"
        ))
        .expect("test key");
        let public: RsaPublicKeyComponents<Vec<u8>> = key.public().into();
        let jwks = format!(
            r#"{{"keys":[{{"kty":"RSA","kid":"k1","alg":"RS256","use":"sig","n":"{}","e":"{}"}}]}}"#,
            b64(&public.n),
            b64(&public.e)
        );
        let keys = KeySet::parse(jwks.as_bytes()).expect("key set");
        let claims = r#"{"aud":["iamlet"],"exp":1700003600,"iat":1700000000,"nbf":1700000000,"iss":"https://kubernetes.default.svc","sub":"system:serviceaccount:shop:web","kubernetes.io":{"namespace":"shop","pod":{"name":"web-0","uid":"u-1"},"serviceaccount":{"name":"web","uid":"s-1"}}}"#;
        let input = format!("{}.{}", b64(br#"{"alg":"RS256","kid":"k1"}"#), b64(claims.as_bytes()));
        let mut signature = vec![0; key.public().modulus_len()];
        key.sign(
            &RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            input.as_bytes(),
            &mut signature,
        )
        .expect("sign");
        let token = format!("{input}.{}", b64(&signature));
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_100);
        (keys, token, now)
    })
}

/// Service-account token verification (the token front): arbitrary text is never a token of
/// the cluster's, and no change at all to a token the cluster signed is accepted.
pub fn service_account_token(data: &[u8]) {
    let (keys, token, now) = cluster();
    let expected = Expected {
        issuer: "https://kubernetes.default.svc",
        audience: "iamlet",
    };
    assert!(
        jwt::verify(token, keys, expected, *now).is_ok(),
        "the cluster's own token"
    );
    let text = String::from_utf8_lossy(data);
    assert!(
        jwt::verify(&text, keys, expected, *now).is_err(),
        "arbitrary text accepted: {text:?}"
    );
    // The data as (position, mask) triples applied to the cluster's token.
    let mut changed = token.as_bytes().to_vec();
    for triple in data.chunks_exact(3) {
        let at = usize::from(u16::from_be_bytes([triple[0], triple[1]])) % changed.len();
        changed[at] ^= triple[2];
    }
    if let Ok(changed) = String::from_utf8(changed)
        && changed != *token
    {
        assert!(
            jwt::verify(&changed, keys, expected, *now).is_err(),
            "a changed token accepted: {changed:?}"
        );
    }
}
