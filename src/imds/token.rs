//! IMDSv2 session tokens: stateless, an HMAC over the expiry and the client's IP under a
//! node-local key. A key kept in a file survives restarts, so tokens outlive the process
//! (aws-sdk-rust keeps a token ~6 h and resends the same one after a 401).

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const KEY_BYTES: usize = 32;
const EXPIRY_BYTES: usize = 8;
const MAC_BYTES: usize = 32;
/// A token's length: its bytes in unpadded base64.
const TOKEN_CHARS: usize = ((EXPIRY_BYTES + MAC_BYTES) * 4).div_ceil(3);

/// The valid range of `X-aws-ec2-metadata-token-ttl-seconds`, as on EC2.
pub const TTL_RANGE: std::ops::RangeInclusive<u64> = 1..=21_600;

/// The key that signs tokens. `Debug` does not show it.
pub struct TokenKey {
    /// HMAC with the key already absorbed: each token costs two hash blocks, not four.
    keyed: Hmac<Sha256>,
    /// Tokens verified lately.
    verified: Verified,
}

/// Tokens verified lately, so that a token sent again (an SDK keeps one for hours and sends it
/// with every request) costs a comparison rather than an HMAC. A token gets in only once its
/// HMAC checked out for the client IP; a hit is for exactly that token from exactly that IP,
/// and its expiry is checked again, so a hit says what verifying again would. Entries share
/// slots: a token pushed out is verified again, nothing worse.
struct Verified {
    slots: Box<[ArcSwapOption<VerifiedToken>]>,
}

struct VerifiedToken {
    ip: IpAddr,
    token: [u8; TOKEN_CHARS],
    expiry: u64,
}

/// Slots in [`Verified`]: far more than the pods of one node.
const VERIFIED_SLOTS: usize = 512;

impl Verified {
    fn new() -> Verified {
        Verified {
            slots: (0..VERIFIED_SLOTS)
                .map(|_| ArcSwapOption::empty())
                .collect(),
        }
    }

    /// The slot of `token`: its last characters come from the MAC, so they are well spread.
    fn slot(&self, token: &[u8; TOKEN_CHARS]) -> &ArcSwapOption<VerifiedToken> {
        let tail = token[TOKEN_CHARS - 8..].iter().fold(0usize, |hash, b| {
            hash.wrapping_mul(31).wrapping_add(usize::from(*b))
        });
        &self.slots[tail % VERIFIED_SLOTS]
    }

    /// The expiry of `token`, if it was verified for `ip`.
    fn expiry(&self, token: &[u8; TOKEN_CHARS], ip: IpAddr) -> Option<u64> {
        let slot = self.slot(token).load();
        let verified = slot.as_ref()?;
        // The IP first: a token is bound to its IP, so another client learns nothing from
        // how long the comparison of the token takes.
        (verified.ip == ip && verified.token == *token).then_some(verified.expiry)
    }

    fn insert(&self, token: &[u8; TOKEN_CHARS], ip: IpAddr, expiry: u64) {
        self.slot(token).store(Some(Arc::new(VerifiedToken {
            ip,
            token: *token,
            expiry,
        })));
    }
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the token key file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot create the token key file {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("the token key file {path} holds {found} bytes, want {KEY_BYTES}")]
    Length { path: PathBuf, found: usize },
}

impl TokenKey {
    /// Reads the key from `path`, or creates the file (mode 0600, parents 0700) with a new
    /// random key when there is none.
    pub fn load_or_create(path: &Path) -> Result<TokenKey, KeyError> {
        match fs::read(path) {
            Ok(bytes) => {
                let key: [u8; KEY_BYTES] =
                    bytes.as_slice().try_into().map_err(|_| KeyError::Length {
                        path: path.to_owned(),
                        found: bytes.len(),
                    })?;
                Ok(TokenKey::from_bytes(&key))
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => Self::create(path),
            Err(source) => Err(KeyError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn create(path: &Path) -> Result<TokenKey, KeyError> {
        let create_err = |source| KeyError::Create {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
            && !parent.exists()
        {
            fs::create_dir_all(parent).map_err(create_err)?;
            fs::set_permissions(parent, fs::Permissions::from_mode(0o700)).map_err(create_err)?;
        }
        let key: [u8; KEY_BYTES] = rand::random();
        // Write beside the target and rename, so a crash never leaves a short key behind.
        let temporary = path.with_extension("tmp");
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(create_err)?;
        file.write_all(&key).map_err(create_err)?;
        file.sync_all().map_err(create_err)?;
        drop(file);
        // Another process may have won the race; keep whichever key landed first.
        match fs::hard_link(&temporary, path) {
            Ok(()) => {
                let _ = fs::remove_file(&temporary);
                Ok(TokenKey::from_bytes(&key))
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                let _ = fs::remove_file(&temporary);
                Self::load_or_create(path)
            }
            Err(source) => {
                let _ = fs::remove_file(&temporary);
                Err(create_err(source))
            }
        }
    }

    /// A key that lives only in memory (tests, and config-less use).
    pub fn random() -> TokenKey {
        TokenKey::from_bytes(&rand::random())
    }

    fn from_bytes(key: &[u8; KEY_BYTES]) -> TokenKey {
        let keyed = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        TokenKey {
            keyed,
            verified: Verified::new(),
        }
    }

    /// A token for `ip`, valid for `ttl` from `now`.
    pub fn mint(&self, ip: IpAddr, ttl: Duration, now: SystemTime) -> String {
        let expiry = unix_seconds(now).saturating_add(ttl.as_secs());
        let ip = ip.to_canonical();
        let mut bytes = [0u8; EXPIRY_BYTES + MAC_BYTES];
        bytes[..EXPIRY_BYTES].copy_from_slice(&expiry.to_be_bytes());
        bytes[EXPIRY_BYTES..].copy_from_slice(&self.mac(expiry, ip).finalize().into_bytes());
        let token = URL_SAFE_NO_PAD.encode(bytes);
        // The client's next request carries it: known good, it need not be verified again.
        if let Ok(text) = <&[u8; TOKEN_CHARS]>::try_from(token.as_bytes()) {
            self.verified.insert(text, ip, expiry);
        }
        token
    }

    /// Whether `token` was minted by this key for `ip` and has not expired at `now`.
    pub fn verify(&self, token: &str, ip: IpAddr, now: SystemTime) -> bool {
        let ip = ip.to_canonical();
        // Anything of another length is no token of ours: refused before decoding.
        let Ok(text) = <&[u8; TOKEN_CHARS]>::try_from(token.trim().as_bytes()) else {
            return false;
        };
        if let Some(expiry) = self.verified.expiry(text, ip) {
            return unix_seconds(now) < expiry;
        }
        let mut bytes = [0u8; EXPIRY_BYTES + MAC_BYTES];
        match URL_SAFE_NO_PAD.decode_slice(text, &mut bytes) {
            Ok(decoded) if decoded == bytes.len() => {}
            _ => return false,
        }
        let (expiry, tag) = bytes.split_at(EXPIRY_BYTES);
        let Ok(expiry) = <[u8; EXPIRY_BYTES]>::try_from(expiry) else {
            return false;
        };
        let expiry = u64::from_be_bytes(expiry);
        // Constant-time comparison of the tag.
        if self.mac(expiry, ip).verify_slice(tag).is_err() {
            return false;
        }
        self.verified.insert(text, ip, expiry);
        unix_seconds(now) < expiry
    }

    fn mac(&self, expiry: u64, ip: IpAddr) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
        mac.update(b"iamlet-imds-token-v1");
        mac.update(&expiry.to_be_bytes());
        let ip = match ip.to_canonical() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        mac.update(&ip.octets());
        mac
    }
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 7));
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 8));

    #[test]
    fn token_is_bound_to_ip_and_expiry() {
        let key = TokenKey::random();
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let token = key.mint(POD, Duration::from_secs(60), now);
        assert!(key.verify(&token, POD, now));
        assert!(key.verify(&token, POD, now + Duration::from_secs(59)));
        assert!(!key.verify(&token, POD, now + Duration::from_secs(61)));
        assert!(!key.verify(&token, OTHER, now));
        assert!(!TokenKey::random().verify(&token, POD, now));
    }

    #[test]
    fn a_token_verified_before_is_still_bound_to_its_ip_and_expiry() {
        let key = TokenKey::random();
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let token = key.mint(POD, Duration::from_secs(60), now);
        assert!(key.verify(&token, POD, now), "verified, and remembered");
        // Remembered tokens answer as verifying them again would.
        assert!(key.verify(&token, POD, now + Duration::from_secs(59)));
        assert!(!key.verify(&token, POD, now + Duration::from_secs(61)));
        assert!(
            !key.verify(&token, OTHER, now),
            "another client, same token"
        );
        assert!(key.verify(&format!(" {token}\n"), POD, now));
        // A refused token is not remembered as good.
        let mut forged = token.clone().into_bytes();
        forged[40] = if forged[40] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).expect("ascii");
        assert!(!key.verify(&forged, POD, now));
        assert!(!key.verify(&forged, POD, now));
        // Many clients' tokens at once, more than there are slots: each still checks out, and
        // none for another client.
        let clients: Vec<IpAddr> = (0..2000u32)
            .map(|i| IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)))
            .collect();
        let tokens: Vec<String> = clients
            .iter()
            .map(|ip| key.mint(*ip, Duration::from_secs(60), now))
            .collect();
        for _ in 0..2 {
            for (i, (ip, token)) in clients.iter().zip(&tokens).enumerate() {
                assert!(key.verify(token, *ip, now));
                assert!(!key.verify(token, clients[(i + 1) % clients.len()], now));
            }
        }
    }

    #[test]
    fn tampered_or_garbage_tokens_fail() {
        let key = TokenKey::random();
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let token = key.mint(POD, Duration::from_secs(60), now);
        let mut bytes = URL_SAFE_NO_PAD.decode(&token).expect("base64");
        // Push the expiry a day out: the tag no longer matches.
        bytes[6] ^= 0x01;
        assert!(!key.verify(&URL_SAFE_NO_PAD.encode(bytes), POD, now));
        for garbage in ["", "x", "not a token", &"A".repeat(56), &"A".repeat(4000)] {
            assert!(!key.verify(garbage, POD, now), "{garbage:?}");
        }
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/token.key");
        let first = TokenKey::load_or_create(&path).expect("created");
        let mode = fs::metadata(&path).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = TokenKey::load_or_create(&path).expect("loaded");
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let token = first.mint(POD, Duration::from_secs(60), now);
        assert!(again.verify(&token, POD, now));
    }

    #[test]
    fn short_key_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token.key");
        fs::write(&path, b"short").expect("write");
        let err = TokenKey::load_or_create(&path).expect_err("short key");
        assert!(err.to_string().contains("token.key"), "{err}");
    }
}
