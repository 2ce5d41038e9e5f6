//! Interception: an iptables rule that sends pods' traffic for 169.254.169.254:80 to iamlet.
//!
//! iamlet owns one chain, `IAMLET`, in the nat table: one DNAT rule in it, one jump to it from
//! PREROUTING. [`Interception::ensure`] makes that so (and is idempotent, so it also repairs);
//! [`remove`] takes both away. Both work in one [`Backend`] (legacy or nft), the one the node's
//! own rules are in ([`backend`] finds it). iptables is called with `--wait`, so it queues
//! behind the xtables lock that kube-proxy and CNIs hold. Calls block: run them off the runtime.
//!
//! The rule stays when iamlet exits unless `remove_on_exit` is set: pods then get "connection
//! refused" from 169.254.169.254 until iamlet is back, rather than the node's own IMDS and the
//! node's role (fail closed).

mod backend;

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use backend::{Backend, BackendChoice, Selection, detect, select};

/// The chain iamlet owns in the nat table.
pub const CHAIN: &str = "IAMLET";
const TABLE: &str = "nat";
const PREROUTING: &str = "PREROUTING";
/// Marks iamlet's rules for whoever reads `iptables-save`.
const COMMENT: &str = "-m comment --comment iamlet-imds-interception";

/// The `[iptables]` section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Install and keep the interception rule.
    pub enabled: bool,
    /// Interfaces pod traffic arrives on: a name, `+` as a trailing wildcard, `!` to negate
    /// (`cali+`, `lxc+`, `eni+`, `!eth0`).
    pub host_interface: String,
    /// Remove the rule when iamlet exits. Off by default: while iamlet is down, pods must not
    /// reach the node's own IMDS.
    pub remove_on_exit: bool,
    /// How often the rule is checked and repaired.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// `legacy`, `nft`, or `auto`: the backend the node's own rules are in.
    pub backend: BackendChoice,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            enabled: false,
            host_interface: "cali+".to_owned(),
            remove_on_exit: false,
            reconcile_interval: Duration::from_secs(10),
            backend: BackendChoice::Auto,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("iptables: cannot {action}: {message}")]
pub struct Error {
    action: String,
    message: String,
}

impl Error {
    // The crate's errors are `Box<dyn Error>` (not `Send`): keep only their text.
    fn from(action: impl Into<String>, err: &dyn std::error::Error) -> Error {
        Error {
            action: action.into(),
            message: err.to_string(),
        }
    }
}

/// Checks `iptables.host_interface`: an interface name of up to 15 characters, optionally
/// prefixed with `!` and ending with the `+` wildcard.
pub fn check_host_interface(spec: &str) -> Result<(), String> {
    let name = spec.strip_prefix('!').unwrap_or(spec);
    let stem = name.strip_suffix('+').unwrap_or(name);
    let valid = !stem.is_empty()
        && name.len() <= 15
        && stem
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{spec:?} is not an interface name (up to 15 characters, optional leading '!' and trailing '+')"
        ))
    }
}

/// The rules that send pods on `host_interface` to iamlet at `target`, in one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interception {
    backend: Backend,
    dnat: String,
    jump: String,
}

impl Interception {
    pub fn new(backend: Backend, host_interface: &str, target: SocketAddr) -> Interception {
        let interface = match host_interface.strip_prefix('!') {
            Some(name) => format!("! -i {name}"),
            None => format!("-i {host_interface}"),
        };
        Interception {
            backend,
            dnat: format!(
                "-p tcp -d 169.254.169.254/32 --dport 80 {interface} {COMMENT} -j DNAT --to-destination {target}"
            ),
            jump: format!("{COMMENT} -j {CHAIN}"),
        }
    }

    /// Makes the chain hold exactly the DNAT rule and PREROUTING jump to it. Returns whether
    /// anything had to change (a first install, or a repair).
    pub fn ensure(&self) -> Result<bool, Error> {
        let ipt = self.backend.iptables()?;
        let mut changed = false;
        let exists = ipt
            .chain_exists(TABLE, CHAIN)
            .map_err(|e| Error::from("check the IAMLET chain", &*e))?;
        if !exists {
            ipt.new_chain(TABLE, CHAIN)
                .map_err(|e| Error::from("create the IAMLET chain", &*e))?;
            changed = true;
        }
        let rules = list(&ipt, CHAIN)?;
        let count = rules.iter().filter(|r| r.starts_with("-A ")).count();
        let ours = ipt
            .exists(TABLE, CHAIN, &self.dnat)
            .map_err(|e| Error::from("check the DNAT rule", &*e))?;
        if count != 1 || !ours {
            ipt.flush_chain(TABLE, CHAIN)
                .map_err(|e| Error::from("flush the IAMLET chain", &*e))?;
            ipt.append(TABLE, CHAIN, &self.dnat)
                .map_err(|e| Error::from("add the DNAT rule", &*e))?;
            changed = true;
        }
        let jumps = ipt
            .exists(TABLE, PREROUTING, &self.jump)
            .map_err(|e| Error::from("check the PREROUTING jump", &*e))?;
        if !jumps {
            ipt.insert(TABLE, PREROUTING, &self.jump, 1)
                .map_err(|e| Error::from("add the PREROUTING jump", &*e))?;
            changed = true;
        }
        Ok(changed)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }
}

/// Removes every PREROUTING jump to the IAMLET chain and the chain itself from `backend`,
/// whatever address it pointed at. Returns whether there was anything to remove.
pub fn remove(backend: Backend) -> Result<bool, Error> {
    let ipt = backend.iptables()?;
    let mut removed = false;
    let prerouting = list(&ipt, PREROUTING)?;
    let prefix = format!("-A {PREROUTING} ");
    for rule in prerouting
        .iter()
        .filter_map(|rule| rule.strip_prefix(&prefix))
        .filter(|rule| rule.ends_with(&format!("-j {CHAIN}")))
    {
        ipt.delete(TABLE, PREROUTING, rule)
            .map_err(|e| Error::from("remove the PREROUTING jump", &*e))?;
        removed = true;
    }
    let exists = ipt
        .chain_exists(TABLE, CHAIN)
        .map_err(|e| Error::from("check the IAMLET chain", &*e))?;
    if exists {
        ipt.flush_chain(TABLE, CHAIN)
            .map_err(|e| Error::from("flush the IAMLET chain", &*e))?;
        ipt.delete_chain(TABLE, CHAIN)
            .map_err(|e| Error::from("delete the IAMLET chain", &*e))?;
        removed = true;
    }
    Ok(removed)
}

/// Lists `chain` as `iptables -S` prints it. The crate does not check the exit status, so an
/// answer without the chain's own header line is taken as the failure it is.
fn list(ipt: &iptables::IPTables, chain: &str) -> Result<Vec<String>, Error> {
    let action = format!("list the {chain} chain");
    let rules = ipt
        .list(TABLE, chain)
        .map_err(|e| Error::from(action.clone(), &*e))?;
    let header = [format!("-N {chain}"), format!("-P {chain} ")];
    if rules
        .iter()
        .any(|r| r == &header[0] || r.starts_with(&header[1]))
    {
        Ok(rules)
    } else {
        Err(Error {
            action,
            message: format!("iptables answered {rules:?}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_specs_follow_iptables() {
        for ok in ["cali+", "lxc+", "eni+", "!eth0", "weave", "veth_x.1"] {
            assert!(check_host_interface(ok).is_ok(), "{ok}");
        }
        for bad in ["", "!", "+", "a b", "eth0;reboot", "sixteen-chars-xx"] {
            assert!(check_host_interface(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rules_match_pod_interfaces_and_target() {
        let target = "10.0.0.5:8181".parse().expect("addr");
        let rule = Interception::new(Backend::Nft, "!eth0", target);
        assert!(rule.dnat.contains("! -i eth0"), "{}", rule.dnat);
        assert!(rule.dnat.contains("-d 169.254.169.254/32 --dport 80"));
        assert!(rule.dnat.ends_with("--to-destination 10.0.0.5:8181"));
        assert!(rule.jump.ends_with("-j IAMLET"));
        let rule = Interception::new(Backend::Legacy, "cali+", target);
        assert!(rule.dnat.contains(" -i cali+ "), "{}", rule.dnat);
    }
}
