//! JOSE, as far as iamlet needs it: a Kubernetes service-account token (a JWS in compact form)
//! checked against the cluster's JSON Web Key Set, and what its claims say about the pod it
//! was issued for. Pure: no I/O, the time is given.
//!
//! Strict on purpose:
//! - only RS256, ES256 and ES384 (what kube-apiserver signs with); never `none`, never HMAC,
//!   and the algorithm must fit the key the token names (no algorithm confusion);
//! - a key id is required, and only keys of the cluster's set are tried;
//! - `typ`, when present, must be `JWT`; a `crit` header is refused (iamlet understands no
//!   extension); duplicate members are refused;
//! - the signature is checked before any claim is read;
//! - `iss` must be the cluster's issuer, `aud` must hold the audience, `exp` must be in the
//!   future, `nbf` and `iat` not in the future (with [`LEEWAY`] for clock skew);
//! - the `kubernetes.io` claims must bind the token to a pod (`pod.name`, `pod.uid`).
//!
//! Nothing here keeps or prints the token.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature;
use serde::Deserialize;

/// Longest token accepted. Projected tokens are about 1 KiB.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Longest encoded JOSE header accepted.
const MAX_HEADER_BYTES: usize = 1024;
/// Clock skew allowed for `nbf` and `iat` (as kube-apiserver allows its own tokens).
pub const LEEWAY: Duration = Duration::from_secs(60);

/// The signature algorithms accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Rs256,
    Es256,
    Es384,
}

impl Algorithm {
    fn parse(name: &str) -> Option<Algorithm> {
        match name {
            "RS256" => Some(Algorithm::Rs256),
            "ES256" => Some(Algorithm::Es256),
            "ES384" => Some(Algorithm::Es384),
            _ => None,
        }
    }
}

/// A public key of the cluster's set.
#[derive(Clone, PartialEq, Eq)]
enum PublicKey {
    /// Modulus and exponent, big-endian, without leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// An uncompressed point (`04 || x || y`) on P-256 or P-384.
    Ec { curve: Curve, point: Vec<u8> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

impl PublicKey {
    /// Whether `algorithm` may be used with this key.
    fn fits(&self, algorithm: Algorithm) -> bool {
        matches!(
            (self, algorithm),
            (PublicKey::Rsa { .. }, Algorithm::Rs256)
                | (
                    PublicKey::Ec {
                        curve: Curve::P256,
                        ..
                    },
                    Algorithm::Es256
                )
                | (
                    PublicKey::Ec {
                        curve: Curve::P384,
                        ..
                    },
                    Algorithm::Es384
                )
        )
    }

    fn verify(&self, algorithm: Algorithm, message: &[u8], signature: &[u8]) -> bool {
        match (self, algorithm) {
            (PublicKey::Rsa { n, e }, Algorithm::Rs256) => {
                signature::RsaPublicKeyComponents { n, e }
                    .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, signature)
                    .is_ok()
            }
            (PublicKey::Ec { point, .. }, Algorithm::Es256) => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, signature)
                    .is_ok()
            }
            (PublicKey::Ec { point, .. }, Algorithm::Es384) => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                    .verify(message, signature)
                    .is_ok()
            }
            _ => false,
        }
    }
}

/// The cluster's signing keys, by key id. Keys iamlet cannot use (other types, curves or
/// algorithms, or without a key id) are left out.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct KeySet {
    keys: HashMap<String, Vec<PublicKey>>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.kids())
            .finish()
    }
}

/// Why a key set document could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a JSON Web Key Set: {0}")]
pub struct KeySetError(String);

#[derive(Deserialize)]
struct JwkSetDocument {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct JwkDocument {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, rename = "use")]
    usage: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

impl KeySet {
    /// Reads a JWKS document (`/openid/v1/jwks`). Unusable keys are skipped, not errors: a
    /// cluster may publish keys of kinds iamlet does not verify.
    pub fn parse(document: &[u8]) -> Result<KeySet, KeySetError> {
        let set: JwkSetDocument =
            serde_json::from_slice(document).map_err(|err| KeySetError(err.to_string()))?;
        let mut keys: HashMap<String, Vec<PublicKey>> = HashMap::new();
        for value in set.keys {
            let Ok(jwk) = serde_json::from_value::<JwkDocument>(value) else {
                continue;
            };
            if let Some((kid, key)) = usable(jwk) {
                keys.entry(kid).or_default().push(key);
            }
        }
        Ok(KeySet { keys })
    }

    /// The key ids, sorted.
    pub fn kids(&self) -> Vec<&str> {
        let mut kids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        kids
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The key id and key of a JWK that iamlet can verify signatures with.
fn usable(jwk: JwkDocument) -> Option<(String, PublicKey)> {
    let kid = jwk.kid.filter(|kid| !kid.is_empty())?;
    if jwk.usage.as_deref().is_some_and(|usage| usage != "sig") {
        return None;
    }
    let key = match jwk.kty.as_str() {
        "RSA" => {
            let n = decode(jwk.n.as_deref()?)?;
            let e = decode(jwk.e.as_deref()?)?;
            PublicKey::Rsa {
                n: without_leading_zeros(n),
                e: without_leading_zeros(e),
            }
        }
        "EC" => {
            let (curve, size) = match jwk.crv.as_deref()? {
                "P-256" => (Curve::P256, 32),
                "P-384" => (Curve::P384, 48),
                _ => return None,
            };
            let x = decode(jwk.x.as_deref()?)?;
            let y = decode(jwk.y.as_deref()?)?;
            if x.len() != size || y.len() != size {
                return None;
            }
            let mut point = Vec::with_capacity(1 + 2 * size);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            PublicKey::Ec { curve, point }
        }
        _ => return None,
    };
    // A key that says which algorithm it is for is used for that one only.
    if let Some(alg) = jwk.alg.as_deref()
        && !Algorithm::parse(alg).is_some_and(|algorithm| key.fits(algorithm))
    {
        return None;
    }
    Some((kid, key))
}

fn without_leading_zeros(mut bytes: Vec<u8>) -> Vec<u8> {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    bytes.drain(..zeros);
    bytes
}

fn decode(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text).ok()
}

/// What a token must say to be accepted.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The cluster's service-account issuer (`iss`).
    pub issuer: &'a str,
    /// The audience the projected token was requested for (`aud`).
    pub audience: &'a str,
}

/// The pod a verified token was issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
}

impl BoundPod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A token that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub pod: BoundPod,
    pub expires: SystemTime,
}

/// Why a token was refused. The texts go to the client (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the token is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error("the token is malformed: {0}")]
    Malformed(&'static str),
    #[error("the token's algorithm is not accepted (RS256, ES256 or ES384 only)")]
    Algorithm,
    #[error("the token names no key id")]
    NoKeyId,
    #[error("the token's key id is not one of the cluster's keys")]
    UnknownKey,
    #[error("the token's algorithm does not fit its key")]
    KeyMismatch,
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token was not issued by this cluster's service-account issuer")]
    Issuer,
    #[error("the token is not for this audience")]
    Audience,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token is not bound to a pod")]
    NotPodBound,
}

impl Rejection {
    /// The `reason` label in metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::TooLarge => "too_large",
            Rejection::Malformed(_) => "malformed",
            Rejection::Algorithm => "algorithm",
            Rejection::NoKeyId => "no_key_id",
            Rejection::UnknownKey => "unknown_key",
            Rejection::KeyMismatch => "key_mismatch",
            Rejection::Signature => "signature",
            Rejection::Issuer => "issuer",
            Rejection::Audience => "audience",
            Rejection::Expired => "expired",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::NotPodBound => "not_pod_bound",
        }
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    exp: Option<f64>,
    #[serde(default)]
    nbf: Option<f64>,
    #[serde(default)]
    iat: Option<f64>,
    #[serde(default, rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, audience: &str) -> bool {
        match self {
            Audience::One(one) => one == audience,
            Audience::Many(many) => many.iter().any(|one| one == audience),
        }
    }
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: String,
    #[serde(default)]
    pod: Option<ObjectRef>,
    serviceaccount: ObjectRef,
}

#[derive(Deserialize)]
struct ObjectRef {
    name: String,
    uid: String,
}

/// Checks `token` against `keys` and `expected` at time `now`.
pub fn verify(
    token: &str,
    keys: &KeySet,
    expected: Expected<'_>,
    now: SystemTime,
) -> Result<Verified, Rejection> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Rejection::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Rejection::Malformed("not three dot-separated parts"));
    };
    if header_b64.len() > MAX_HEADER_BYTES {
        return Err(Rejection::Malformed("the header is too long"));
    }
    let header = decode(header_b64).ok_or(Rejection::Malformed("the header is not base64url"))?;
    let header: Header = serde_json::from_slice(&header)
        .map_err(|_| Rejection::Malformed("the header is not a JOSE header"))?;
    let algorithm = Algorithm::parse(&header.alg).ok_or(Rejection::Algorithm)?;
    if header
        .typ
        .as_deref()
        .is_some_and(|typ| !typ.eq_ignore_ascii_case("JWT"))
    {
        return Err(Rejection::Malformed("the header's typ is not JWT"));
    }
    if header.crit.is_some() {
        return Err(Rejection::Malformed("the header has critical extensions"));
    }
    let kid = header
        .kid
        .filter(|kid| !kid.is_empty())
        .ok_or(Rejection::NoKeyId)?;
    let candidates = keys.keys.get(&kid).ok_or(Rejection::UnknownKey)?;
    let signature =
        decode(signature_b64).ok_or(Rejection::Malformed("the signature is not base64url"))?;
    let signed = &token.as_bytes()[..header_b64.len() + 1 + payload_b64.len()];
    let mut fitting = candidates
        .iter()
        .filter(|key| key.fits(algorithm))
        .peekable();
    if fitting.peek().is_none() {
        return Err(Rejection::KeyMismatch);
    }
    if !fitting.any(|key| key.verify(algorithm, signed, &signature)) {
        return Err(Rejection::Signature);
    }

    // Signed by the cluster: now the claims may be read.
    let payload =
        decode(payload_b64).ok_or(Rejection::Malformed("the payload is not base64url"))?;
    let claims: Claims = serde_json::from_slice(&payload)
        .map_err(|_| Rejection::Malformed("the payload is not a JWT claims set"))?;
    if claims.iss.as_deref() != Some(expected.issuer) {
        return Err(Rejection::Issuer);
    }
    if !claims
        .aud
        .as_ref()
        .is_some_and(|aud| aud.contains(expected.audience))
    {
        return Err(Rejection::Audience);
    }
    let expires = claims
        .exp
        .ok_or(Rejection::Malformed("the token has no expiry"))
        .and_then(time)?;
    if now >= expires {
        return Err(Rejection::Expired);
    }
    for start in [claims.nbf, claims.iat].into_iter().flatten() {
        if time(start)? > now + LEEWAY {
            return Err(Rejection::NotYetValid);
        }
    }
    let kubernetes = claims.kubernetes.ok_or(Rejection::NotPodBound)?;
    let pod = kubernetes.pod.ok_or(Rejection::NotPodBound)?;
    if [
        &kubernetes.namespace,
        &pod.name,
        &pod.uid,
        &kubernetes.serviceaccount.name,
    ]
    .iter()
    .any(|value| value.is_empty())
    {
        return Err(Rejection::NotPodBound);
    }
    let subject = format!(
        "system:serviceaccount:{}:{}",
        kubernetes.namespace, kubernetes.serviceaccount.name
    );
    if claims.sub.as_deref().is_some_and(|sub| sub != subject) {
        return Err(Rejection::Malformed(
            "the subject does not match the kubernetes.io claims",
        ));
    }
    Ok(Verified {
        pod: BoundPod {
            namespace: kubernetes.namespace,
            name: pod.name,
            uid: pod.uid,
            service_account: kubernetes.serviceaccount.name,
        },
        expires,
    })
}

/// A NumericDate (seconds since the epoch) as a time.
fn time(seconds: f64) -> Result<SystemTime, Rejection> {
    if !seconds.is_finite() || !(0.0..=1e11).contains(&seconds) {
        return Err(Rejection::Malformed("a time claim is out of range"));
    }
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests;
