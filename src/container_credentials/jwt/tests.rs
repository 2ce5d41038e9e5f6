use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::*;
use crate::container_credentials::testing::{AUDIENCE, ISSUER, POD_UID, Signer, b64, claims, jwks};

const EXPECTED: Expected<'static> = Expected {
    issuer: ISSUER,
    audience: AUDIENCE,
};

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn keys(signers: &[&Signer]) -> KeySet {
    KeySet::parse(&jwks(signers)).expect("key set")
}

fn check(token: &str, keys: &KeySet) -> Result<Verified, Rejection> {
    verify(token, keys, EXPECTED, now())
}

#[test]
fn a_token_of_the_cluster_names_its_pod() {
    let cluster = Signer::cluster();
    let verified = check(&cluster.sign(&claims(now())), &keys(&[&cluster])).expect("valid");
    assert_eq!(
        verified.pod,
        BoundPod {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: POD_UID.into(),
            service_account: "web".into(),
        }
    );
    assert_eq!(verified.expires, now() + Duration::from_secs(3600));
}

#[test]
fn ec_keys_verify_es256_and_es384() {
    for signer in [Signer::p256("ec-256"), Signer::p384("ec-384")] {
        let keys = keys(&[&Signer::cluster(), &signer]);
        assert!(
            check(&signer.sign(&claims(now())), &keys).is_ok(),
            "{}",
            signer.alg()
        );
    }
}

#[test]
fn a_signature_by_another_key_under_the_clusters_kid_is_refused() {
    let cluster = Signer::cluster();
    let forger = Signer::attacker(&cluster.kid);
    assert_eq!(
        check(&forger.sign(&claims(now())), &keys(&[&cluster])),
        Err(Rejection::Signature)
    );
}

#[test]
fn a_changed_claim_breaks_the_signature() {
    let cluster = Signer::cluster();
    let token = cluster.sign(&claims(now()));
    let mut parts: Vec<&str> = token.split('.').collect();
    let mut other = claims(now());
    other["kubernetes.io"]["pod"]["uid"] = json!("someone-else");
    let payload = b64(other.to_string().as_bytes());
    parts[1] = &payload;
    assert_eq!(
        check(&parts.join("."), &keys(&[&cluster])),
        Err(Rejection::Signature)
    );
    // And a signature of another token.
    let second = cluster.sign(&other);
    let spliced = format!(
        "{}.{}",
        token.rsplit_once('.').expect("dots").0,
        second.rsplit_once('.').expect("dots").1
    );
    assert_eq!(
        check(&spliced, &keys(&[&cluster])),
        Err(Rejection::Signature)
    );
}

#[test]
fn alg_none_and_hmac_are_refused() {
    let cluster = Signer::cluster();
    let keys = keys(&[&cluster]);
    let unsigned = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "kid": cluster.kid})
            .to_string()
            .as_bytes()),
        b64(claims(now()).to_string().as_bytes())
    );
    assert_eq!(check(&unsigned, &keys), Err(Rejection::Algorithm));
    // HS256 keyed with the cluster's public key: the classic confusion attack.
    for alg in ["HS256", "RS384", "PS256", "ES512", "rs256", ""] {
        let token =
            cluster.sign_with_header(&json!({"alg": alg, "kid": cluster.kid}), &claims(now()));
        assert_eq!(check(&token, &keys), Err(Rejection::Algorithm), "{alg}");
    }
}

#[test]
fn an_algorithm_that_does_not_fit_the_key_is_refused() {
    let cluster = Signer::cluster();
    let ec = Signer::p256("ec");
    let keys = keys(&[&cluster, &ec]);
    // ES256 claimed for the RSA key, RS256 for the EC key.
    let token = ec.sign_with_header(&json!({"alg": "ES256", "kid": cluster.kid}), &claims(now()));
    assert_eq!(check(&token, &keys), Err(Rejection::KeyMismatch));
    let token = cluster.sign_with_header(&json!({"alg": "RS256", "kid": ec.kid}), &claims(now()));
    assert_eq!(check(&token, &keys), Err(Rejection::KeyMismatch));
    let p384 = Signer::p384("ec384");
    let token = p384.sign_with_header(&json!({"alg": "ES384", "kid": ec.kid}), &claims(now()));
    assert_eq!(check(&token, &keys), Err(Rejection::KeyMismatch));
}

#[test]
fn a_key_id_is_required_and_must_be_the_clusters() {
    let cluster = Signer::cluster();
    let keys = keys(&[&cluster]);
    for header in [json!({"alg": "RS256"}), json!({"alg": "RS256", "kid": ""})] {
        let token = cluster.sign_with_header(&header, &claims(now()));
        assert_eq!(check(&token, &keys), Err(Rejection::NoKeyId), "{header}");
    }
    let token = cluster.sign_with_header(&json!({"alg": "RS256", "kid": "other"}), &claims(now()));
    assert_eq!(check(&token, &keys), Err(Rejection::UnknownKey));
}

#[test]
fn typ_must_be_jwt_and_crit_is_refused() {
    let cluster = Signer::cluster();
    let keys = keys(&[&cluster]);
    let with = |extra: Value| {
        let mut header = json!({"alg": "RS256", "kid": cluster.kid});
        for (k, v) in extra.as_object().expect("object") {
            header[k] = v.clone();
        }
        check(&cluster.sign_with_header(&header, &claims(now())), &keys)
    };
    assert!(with(json!({"typ": "JWT"})).is_ok());
    assert!(with(json!({"typ": "jwt"})).is_ok());
    assert!(matches!(
        with(json!({"typ": "at+jwt"})),
        Err(Rejection::Malformed(_))
    ));
    assert!(matches!(
        with(json!({"crit": ["exp"]})),
        Err(Rejection::Malformed(_))
    ));
}

#[test]
fn duplicate_header_members_are_refused() {
    let cluster = Signer::cluster();
    let header = format!(r#"{{"alg":"none","alg":"RS256","kid":"{}"}}"#, cluster.kid);
    let input = format!(
        "{}.{}",
        b64(header.as_bytes()),
        b64(claims(now()).to_string().as_bytes())
    );
    let token = format!("{input}.{}", b64(&cluster.signature(input.as_bytes())));
    assert!(matches!(
        check(&token, &keys(&[&cluster])),
        Err(Rejection::Malformed(_))
    ));
}

#[test]
fn issuer_and_audience_must_match() {
    let cluster = Signer::cluster();
    let keys = keys(&[&cluster]);
    let with = |field: &str, value: Value| {
        let mut claims = claims(now());
        claims[field] = value;
        check(&cluster.sign(&claims), &keys)
    };
    assert_eq!(
        with("iss", json!("https://evil.example")),
        Err(Rejection::Issuer)
    );
    assert_eq!(with("iss", Value::Null), Err(Rejection::Issuer));
    assert_eq!(
        with("aud", json!(["https://kubernetes.default.svc"])),
        Err(Rejection::Audience)
    );
    assert_eq!(with("aud", json!([])), Err(Rejection::Audience));
    assert_eq!(with("aud", Value::Null), Err(Rejection::Audience));
    assert_eq!(with("aud", json!("iamlets")), Err(Rejection::Audience));
    // One of several audiences, or the single-string form.
    assert!(with("aud", json!(["sts.amazonaws.com", AUDIENCE])).is_ok());
    assert!(with("aud", json!(AUDIENCE)).is_ok());
}

#[test]
fn expiry_and_not_before_edges() {
    let cluster = Signer::cluster();
    let keys = keys(&[&cluster]);
    let secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .expect("epoch")
            .as_secs()
    };
    let with = |field: &str, at: SystemTime| {
        let mut claims = claims(now());
        claims[field] = json!(secs(at));
        check(&cluster.sign(&claims), &keys)
    };
    let second = Duration::from_secs(1);
    assert_eq!(with("exp", now()), Err(Rejection::Expired), "exp == now");
    assert_eq!(with("exp", now() - second), Err(Rejection::Expired));
    assert!(with("exp", now() + second).is_ok());
    assert!(with("nbf", now() + LEEWAY).is_ok(), "within the leeway");
    assert_eq!(
        with("nbf", now() + LEEWAY + second),
        Err(Rejection::NotYetValid)
    );
    assert_eq!(
        with("iat", now() + LEEWAY + second),
        Err(Rejection::NotYetValid)
    );
    let mut no_exp = claims(now());
    no_exp.as_object_mut().expect("object").remove("exp");
    assert!(matches!(
        check(&cluster.sign(&no_exp), &keys),
        Err(Rejection::Malformed(_))
    ));
    for bad in [json!(-1), json!(1e300), json!("soon")] {
        let mut claims = claims(now());
        claims["exp"] = bad.clone();
        assert!(
            matches!(
                check(&cluster.sign(&claims), &keys),
                Err(Rejection::Malformed(_))
            ),
            "{bad}"
        );
    }
}

#[test]
fn a_token_must_be_bound_to_a_pod() {
    let cluster = Signer::cluster();
    let keys = keys(&[&cluster]);
    let mut secret_bound = claims(now());
    secret_bound["kubernetes.io"]
        .as_object_mut()
        .expect("object")
        .remove("pod");
    secret_bound["kubernetes.io"]["secret"] = json!({"name": "s", "uid": "u"});
    assert_eq!(
        check(&cluster.sign(&secret_bound), &keys),
        Err(Rejection::NotPodBound)
    );
    let mut unbound = claims(now());
    unbound
        .as_object_mut()
        .expect("object")
        .remove("kubernetes.io");
    assert_eq!(
        check(&cluster.sign(&unbound), &keys),
        Err(Rejection::NotPodBound)
    );
    let mut empty_uid = claims(now());
    empty_uid["kubernetes.io"]["pod"]["uid"] = json!("");
    assert_eq!(
        check(&cluster.sign(&empty_uid), &keys),
        Err(Rejection::NotPodBound)
    );
    let mut other_subject = claims(now());
    other_subject["sub"] = json!("system:serviceaccount:kube-system:admin");
    assert!(matches!(
        check(&cluster.sign(&other_subject), &keys),
        Err(Rejection::Malformed(_))
    ));
}

#[test]
fn newer_claims_are_ignored() {
    // Kubernetes 1.30+ adds the node; iamlet checks the node by its own index instead.
    let cluster = Signer::cluster();
    let mut claims = claims(now());
    claims["kubernetes.io"]["node"] = json!({"name": "node-1", "uid": "n"});
    claims["jti"] = json!("abc");
    assert!(check(&cluster.sign(&claims), &keys(&[&cluster])).is_ok());
}

#[test]
fn garbage_and_oversized_tokens_are_refused() {
    let cluster = Signer::cluster();
    let keys = keys(&[&cluster]);
    let valid = cluster.sign(&claims(now()));
    let garbage = [
        "",
        ".",
        "..",
        "...",
        "a.b.c",
        "a.b.c.d",
        "not a token",
        "eyJhbGciOiJSUzI1NiJ9",
        "%%%.%%%.%%%",
        "e30.e30.",
        "W10.e30.AAAA",
    ];
    for token in garbage {
        let rejection = check(token, &keys).expect_err(token);
        assert!(
            matches!(rejection, Rejection::Malformed(_) | Rejection::NoKeyId),
            "{token:?}: {rejection:?}"
        );
    }
    // Padding and whitespace are not base64url.
    let padded = valid.replacen('.', "=.", 1);
    assert!(matches!(
        check(&padded, &keys),
        Err(Rejection::Malformed(_))
    ));
    assert!(check(&format!(" {valid}"), &keys).is_err());
    // Size limits: the whole token, and the header alone.
    let huge = format!("{valid}{}", "A".repeat(MAX_TOKEN_BYTES));
    assert_eq!(check(&huge, &keys), Err(Rejection::TooLarge));
    let big_header = json!({"alg": "RS256", "kid": cluster.kid, "x": "y".repeat(2000)});
    let token = cluster.sign_with_header(&big_header, &claims(now()));
    assert!(matches!(check(&token, &keys), Err(Rejection::Malformed(_))));
    // A signature of the wrong length.
    let (signed, _) = valid.rsplit_once('.').expect("dots");
    assert_eq!(
        check(&format!("{signed}.{}", b64(&[1, 2, 3])), &keys),
        Err(Rejection::Signature)
    );
}

#[test]
fn unusable_keys_are_left_out_of_the_set() {
    let cluster = Signer::cluster();
    let ec = Signer::p256("ec");
    let mut wrong_alg = ec.jwk();
    wrong_alg["alg"] = json!("RS256");
    wrong_alg["kid"] = json!("wrong-alg");
    let mut encryption = cluster.jwk();
    encryption["use"] = json!("enc");
    encryption["kid"] = json!("enc");
    let document = json!({"keys": [
        cluster.jwk(),
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
        {"kty": "EC", "kid": "p521", "crv": "P-521", "x": "AA", "y": "AA"},
        wrong_alg,
        encryption,
        "not a key",
    ]});
    let set = KeySet::parse(document.to_string().as_bytes()).expect("set");
    assert_eq!(set.kids(), ["cluster-rsa"]);
    assert!(KeySet::parse(b"{}").is_err());
    assert!(KeySet::parse(b"<html>").is_err());
    // Debug shows key ids only.
    assert_eq!(format!("{set:?}"), "KeySet { kids: [\"cluster-rsa\"] }");
}
