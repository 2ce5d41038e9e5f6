//! Test keys and tokens: a cluster that signs like kube-apiserver does (RS256, and ES256/ES384
//! for clusters with EC keys), and an attacker who signs with a key of their own.

use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};

pub const ISSUER: &str = "https://kubernetes.default.svc";
pub const AUDIENCE: &str = "iamlet";
pub const POD_UID: &str = "0f9e5c7a-1111-4222-8333-444455556666";

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

enum Key {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair, &'static str, &'static str),
}

/// Someone who signs tokens: the cluster, or an attacker.
pub struct Signer {
    pub kid: String,
    key: Key,
}

impl Signer {
    /// The cluster's RSA key (RS256), as kube-apiserver's `--service-account-signing-key-file`.
    pub fn cluster() -> Signer {
        Self::rsa(include_bytes!("testdata/rsa-cluster.pk8"), "cluster-rsa")
    }

    /// Another RSA key, not the cluster's, under key id `kid`.
    pub fn attacker(kid: &str) -> Signer {
        Self::rsa(include_bytes!("testdata/rsa-attacker.pk8"), kid)
    }

    fn rsa(pkcs8: &[u8], kid: &str) -> Signer {
        Signer {
            kid: kid.to_owned(),
            key: Key::Rsa(RsaKeyPair::from_pkcs8(pkcs8).expect("test RSA key")),
        }
    }

    /// A fresh P-256 key (ES256).
    pub fn p256(kid: &str) -> Signer {
        Self::ec(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            "ES256",
            "P-256",
            kid,
        )
    }

    /// A fresh P-384 key (ES384).
    pub fn p384(kid: &str) -> Signer {
        Self::ec(
            &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            "ES384",
            "P-384",
            kid,
        )
    }

    fn ec(
        algorithm: &'static signature::EcdsaSigningAlgorithm,
        alg: &'static str,
        crv: &'static str,
        kid: &str,
    ) -> Signer {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(algorithm, &rng).expect("generate");
        let pair = EcdsaKeyPair::from_pkcs8(algorithm, pkcs8.as_ref(), &rng).expect("EC key");
        Signer {
            kid: kid.to_owned(),
            key: Key::Ec(pair, alg, crv),
        }
    }

    pub fn alg(&self) -> &'static str {
        match &self.key {
            Key::Rsa(_) => "RS256",
            Key::Ec(_, alg, _) => alg,
        }
    }

    /// The public key as the cluster's JWKS lists it.
    pub fn jwk(&self) -> Value {
        match &self.key {
            Key::Rsa(pair) => {
                let public: signature::RsaPublicKeyComponents<Vec<u8>> = pair.public().into();
                json!({"use": "sig", "kty": "RSA", "kid": self.kid, "alg": "RS256",
                       "n": b64(&public.n), "e": b64(&public.e)})
            }
            Key::Ec(pair, alg, crv) => {
                let point = pair.public_key().as_ref();
                let size = (point.len() - 1) / 2;
                json!({"use": "sig", "kty": "EC", "kid": self.kid, "alg": alg, "crv": crv,
                       "x": b64(&point[1..=size]), "y": b64(&point[1 + size..])})
            }
        }
    }

    /// The signature of `input` with this key, as JWS puts it.
    pub fn signature(&self, input: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.key {
            Key::Rsa(pair) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(&signature::RSA_PKCS1_SHA256, &rng, input, &mut signature)
                    .expect("sign");
                signature
            }
            Key::Ec(pair, _, _) => pair.sign(&rng, input).expect("sign").as_ref().to_vec(),
        }
    }

    /// A compact JWS of `claims` under `header`, as given.
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        format!("{input}.{}", b64(&self.signature(input.as_bytes())))
    }

    /// A token as kube-apiserver writes them: `{"alg", "kid"}` and `claims`.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with_header(&json!({"alg": self.alg(), "kid": self.kid}), claims)
    }
}

/// A JWKS document with these signers' keys.
pub fn jwks(signers: &[&Signer]) -> Vec<u8> {
    let keys: Vec<Value> = signers.iter().map(|signer| signer.jwk()).collect();
    json!({ "keys": keys }).to_string().into_bytes()
}

/// The claims of a projected token for pod `shop/web-0`, issued at `now` for an hour.
pub fn claims(now: SystemTime) -> Value {
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    json!({
        "aud": [AUDIENCE],
        "exp": now + 3600,
        "iat": now,
        "nbf": now,
        "iss": ISSUER,
        "sub": "system:serviceaccount:shop:web",
        "kubernetes.io": {
            "namespace": "shop",
            "pod": {"name": "web-0", "uid": POD_UID},
            "serviceaccount": {"name": "web", "uid": "5a5a5a5a-0000-4000-8000-000000000001"}
        }
    })
}
