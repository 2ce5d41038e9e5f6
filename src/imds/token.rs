//! IMDSv2 session tokens: stateless, an HMAC over the expiry and the client's IP under a
//! node-local key. A key kept in a file survives restarts, so tokens outlive the process
//! (aws-sdk-rust keeps a token ~6 h and resends the same one after a 401).

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const KEY_BYTES: usize = 32;
const EXPIRY_BYTES: usize = 8;
const MAC_BYTES: usize = 32;

/// The valid range of `X-aws-ec2-metadata-token-ttl-seconds`, as on EC2.
pub const TTL_RANGE: std::ops::RangeInclusive<u64> = 1..=21_600;

/// The key that signs tokens. `Debug` does not show it.
pub struct TokenKey([u8; KEY_BYTES]);

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
                Ok(TokenKey(key))
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
                Ok(TokenKey(key))
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
        TokenKey(rand::random())
    }

    /// A token for `ip`, valid for `ttl` from `now`.
    pub fn mint(&self, ip: IpAddr, ttl: Duration, now: SystemTime) -> String {
        let expiry = unix_seconds(now).saturating_add(ttl.as_secs());
        let mut bytes = Vec::with_capacity(EXPIRY_BYTES + MAC_BYTES);
        bytes.extend_from_slice(&expiry.to_be_bytes());
        bytes.extend_from_slice(&self.mac(expiry, ip).finalize().into_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Whether `token` was minted by this key for `ip` and has not expired at `now`.
    pub fn verify(&self, token: &str, ip: IpAddr, now: SystemTime) -> bool {
        let Ok(bytes) = URL_SAFE_NO_PAD.decode(token.trim()) else {
            return false;
        };
        if bytes.len() != EXPIRY_BYTES + MAC_BYTES {
            return false;
        }
        let (expiry, tag) = bytes.split_at(EXPIRY_BYTES);
        let Ok(expiry) = <[u8; EXPIRY_BYTES]>::try_from(expiry) else {
            return false;
        };
        let expiry = u64::from_be_bytes(expiry);
        // Constant-time comparison of the tag.
        let authentic = self.mac(expiry, ip).verify_slice(tag).is_ok();
        authentic && unix_seconds(now) < expiry
    }

    fn mac(&self, expiry: u64, ip: IpAddr) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
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
