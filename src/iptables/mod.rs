//! Interception: iptables rules that send pods' traffic for 169.254.169.254:80 to iamlet's
//! IMDS, and, with the token front, pods' and the node's own traffic for 169.254.170.23:80 to
//! `container_credentials.listen`.
//!
//! iamlet owns two chains in the nat table. `IAMLET`, jumped to from PREROUTING, holds the
//! DNAT rules for traffic arriving on pod interfaces: the IMDS rule, and the token front's
//! when it is on. `IAMLET-LOCAL`, jumped to from OUTPUT, exists only with the token front: one
//! DNAT rule for 169.254.170.23:80 from the node itself, so host-network pods reach the token
//! front too. The node's own processes get nothing from it without a valid pod token, and
//! their traffic to 169.254.169.254 is untouched: they keep the node's real IMDS, as before.
//! [`Interception::ensure`] makes the chains hold exactly their rules (and is idempotent, so
//! it also repairs, and removes `IAMLET-LOCAL` once the token front is off); [`remove`] takes
//! everything away. Both work in one [`Backend`] (legacy or nft), the one the node's own rules
//! are in ([`backend`] finds it). iptables is called with `--wait`, so it queues behind the
//! xtables lock that kube-proxy and CNIs hold. Calls block: run them off the runtime.
//!
//! The rules stay when iamlet exits unless `remove_on_exit` is set: pods then get "connection
//! refused" from 169.254.169.254 until iamlet is back, rather than the node's own IMDS and the
//! node's role (fail closed).

mod backend;

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use backend::{Backend, BackendChoice, Selection, detect, select};

/// The chain iamlet owns in the nat table for pod traffic.
pub const CHAIN: &str = "IAMLET";
/// The chain iamlet owns in the nat table for the node's own traffic (the token front only).
pub const LOCAL_CHAIN: &str = "IAMLET-LOCAL";
const TABLE: &str = "nat";
const PREROUTING: &str = "PREROUTING";
const OUTPUT: &str = "OUTPUT";
/// Marks iamlet's rules for whoever reads `iptables-save`.
const COMMENT: &str = "-m comment --comment iamlet-imds-interception";
const TOKEN_COMMENT: &str = "-m comment --comment iamlet-container-credentials";
/// The address pods are told the token front is at (`AWS_CONTAINER_CREDENTIALS_FULL_URI`).
const TOKEN_FRONT: &str = "169.254.170.23/32";

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

/// The rules that send pods on `host_interface` to iamlet, in one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interception {
    backend: Backend,
    /// `-i <host_interface>`, or `! -i <name>`.
    interface: String,
    /// The rules of [`CHAIN`], for pod traffic.
    pod_rules: Vec<String>,
    jump: String,
    /// The rules of [`LOCAL_CHAIN`], for the node's own traffic; none = no such chain.
    local_rules: Vec<String>,
    local_jump: String,
}

impl Interception {
    /// Pods' 169.254.169.254:80 to iamlet's IMDS at `target`.
    pub fn new(backend: Backend, host_interface: &str, target: SocketAddr) -> Interception {
        let interface = match host_interface.strip_prefix('!') {
            Some(name) => format!("! -i {name}"),
            None => format!("-i {host_interface}"),
        };
        Interception {
            backend,
            pod_rules: vec![format!(
                "-p tcp -d 169.254.169.254/32 --dport 80 {interface} {COMMENT} -j DNAT --to-destination {target}"
            )],
            interface,
            jump: format!("{COMMENT} -j {CHAIN}"),
            local_rules: Vec::new(),
            local_jump: format!("{TOKEN_COMMENT} -j {LOCAL_CHAIN}"),
        }
    }

    /// Also pods' and the node's own 169.254.170.23:80 to the token front at `target`.
    pub fn with_token_front(mut self, target: SocketAddr) -> Interception {
        let dnat = format!(
            "-p tcp -d {TOKEN_FRONT} --dport 80 {TOKEN_COMMENT} -j DNAT --to-destination {target}"
        );
        let interface = &self.interface;
        self.pod_rules.push(format!(
            "-p tcp -d {TOKEN_FRONT} --dport 80 {interface} {TOKEN_COMMENT} -j DNAT --to-destination {target}"
        ));
        self.local_rules = vec![dnat];
        self
    }

    /// Makes the chains hold exactly their rules, and PREROUTING (and OUTPUT, with the token
    /// front) jump to them; removes [`LOCAL_CHAIN`] when the token front is off. Returns
    /// whether anything had to change (a first install, or a repair).
    pub fn ensure(&self) -> Result<bool, Error> {
        let ipt = self.backend.iptables()?;
        let mut changed = ensure_chain(&ipt, CHAIN, &self.pod_rules)?;
        changed |= ensure_jump(&ipt, PREROUTING, &self.jump)?;
        if self.local_rules.is_empty() {
            changed |= remove_chain(&ipt, OUTPUT, LOCAL_CHAIN)?;
        } else {
            changed |= ensure_chain(&ipt, LOCAL_CHAIN, &self.local_rules)?;
            changed |= ensure_jump(&ipt, OUTPUT, &self.local_jump)?;
        }
        if !changed {
            // Each quiet reconcile round shows at debug, so a "never churns" check can count them.
            tracing::debug!("interception rule checked: intact");
        }
        Ok(changed)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }
}

/// Makes `chain` exist and hold exactly `rules` (in any order: they match disjoint traffic).
fn ensure_chain(ipt: &iptables::IPTables, chain: &str, rules: &[String]) -> Result<bool, Error> {
    let mut changed = false;
    let exists = ipt
        .chain_exists(TABLE, chain)
        .map_err(|e| Error::from(format!("check the {chain} chain"), &*e))?;
    if !exists {
        ipt.new_chain(TABLE, chain)
            .map_err(|e| Error::from(format!("create the {chain} chain"), &*e))?;
        changed = true;
    }
    let count = list(ipt, chain)?
        .iter()
        .filter(|r| r.starts_with("-A "))
        .count();
    let mut all_there = count == rules.len();
    for rule in rules {
        if !all_there {
            break;
        }
        all_there = ipt
            .exists(TABLE, chain, rule)
            .map_err(|e| Error::from(format!("check the {chain} chain's rules"), &*e))?;
    }
    if !all_there {
        ipt.flush_chain(TABLE, chain)
            .map_err(|e| Error::from(format!("flush the {chain} chain"), &*e))?;
        for rule in rules {
            ipt.append(TABLE, chain, rule)
                .map_err(|e| Error::from(format!("add a DNAT rule to {chain}"), &*e))?;
        }
        changed = true;
    }
    Ok(changed)
}

/// Makes `jump` the first rule of built-in chain `from` if it is not in it.
fn ensure_jump(ipt: &iptables::IPTables, from: &str, jump: &str) -> Result<bool, Error> {
    let jumps = ipt
        .exists(TABLE, from, jump)
        .map_err(|e| Error::from(format!("check the {from} jump"), &*e))?;
    if !jumps {
        ipt.insert(TABLE, from, jump, 1)
            .map_err(|e| Error::from(format!("add the {from} jump"), &*e))?;
    }
    Ok(!jumps)
}

/// Removes every jump from `from` to `chain`, whatever its match, and `chain` itself. Returns
/// whether there was anything to remove.
fn remove_chain(ipt: &iptables::IPTables, from: &str, chain: &str) -> Result<bool, Error> {
    let mut removed = false;
    let prefix = format!("-A {from} ");
    let suffix = format!("-j {chain}");
    for rule in list(ipt, from)?
        .iter()
        .filter_map(|rule| rule.strip_prefix(&prefix))
        .filter(|rule| rule.ends_with(&suffix))
    {
        ipt.delete(TABLE, from, rule)
            .map_err(|e| Error::from(format!("remove the {from} jump"), &*e))?;
        removed = true;
    }
    let exists = ipt
        .chain_exists(TABLE, chain)
        .map_err(|e| Error::from(format!("check the {chain} chain"), &*e))?;
    if exists {
        ipt.flush_chain(TABLE, chain)
            .map_err(|e| Error::from(format!("flush the {chain} chain"), &*e))?;
        ipt.delete_chain(TABLE, chain)
            .map_err(|e| Error::from(format!("delete the {chain} chain"), &*e))?;
        removed = true;
    }
    Ok(removed)
}

/// Removes iamlet's chains and every jump to them from `backend`, whatever addresses they
/// pointed at. Returns whether there was anything to remove.
pub fn remove(backend: Backend) -> Result<bool, Error> {
    let ipt = backend.iptables()?;
    let pods = remove_chain(&ipt, PREROUTING, CHAIN)?;
    let local = remove_chain(&ipt, OUTPUT, LOCAL_CHAIN)?;
    Ok(pods || local)
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
        let [dnat] = rule.pod_rules.as_slice() else {
            panic!("one rule: {:?}", rule.pod_rules);
        };
        assert!(dnat.contains("! -i eth0"), "{dnat}");
        assert!(dnat.contains("-d 169.254.169.254/32 --dport 80"));
        assert!(dnat.ends_with("--to-destination 10.0.0.5:8181"));
        assert!(rule.jump.ends_with("-j IAMLET"));
        assert!(
            rule.local_rules.is_empty(),
            "no OUTPUT rule without the token front"
        );
        let rule = Interception::new(Backend::Legacy, "cali+", target);
        assert!(rule.pod_rules[0].contains(" -i cali+ "), "{rule:?}");
    }

    #[test]
    fn the_token_front_adds_a_pod_rule_and_one_for_the_node() {
        let imds = "10.0.0.5:8181".parse().expect("addr");
        let front = "10.0.0.5:8183".parse().expect("addr");
        let rule = Interception::new(Backend::Nft, "cali+", imds).with_token_front(front);
        let [imds_rule, token_rule] = rule.pod_rules.as_slice() else {
            panic!("two rules: {:?}", rule.pod_rules);
        };
        // The IMDS rule is exactly what it was without the token front.
        assert_eq!(
            imds_rule,
            &Interception::new(Backend::Nft, "cali+", imds).pod_rules[0]
        );
        assert!(token_rule.contains("-d 169.254.170.23/32 --dport 80 -i cali+ "));
        assert!(token_rule.ends_with("--to-destination 10.0.0.5:8183"));
        // The node's own traffic: only 169.254.170.23, from any process, to the token front.
        let [local] = rule.local_rules.as_slice() else {
            panic!("one local rule: {:?}", rule.local_rules);
        };
        assert!(local.starts_with("-p tcp -d 169.254.170.23/32 --dport 80 -m comment"));
        assert!(!local.contains(" -i ") && !local.contains("169.254.169.254"));
        assert!(local.ends_with("--to-destination 10.0.0.5:8183"));
        assert!(rule.local_jump.ends_with("-j IAMLET-LOCAL"));
    }
}
