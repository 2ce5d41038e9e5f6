//! Which iptables backend the rule goes into: legacy (the kernel's x_tables) or nft (the
//! nftables kernel API behind the iptables syntax). The two are separate rule sets in the
//! kernel, and each node uses one: a rule written to the other is never seen by the node's
//! own tools and sits outside its ordering. So iamlet uses the backend the node's rules are in.
//!
//! Detection follows kube-proxy's `iptables-wrapper` (kubernetes-sigs/iptables-wrappers):
//! kubelet (1.17 and later) creates `KUBE-IPTABLES-HINT` or `KUBE-KUBELET-CANARY` in the
//! backend it uses, so those chains decide first; otherwise the backend holding more rules wins,
//! and nft (Debian's default, and the wrapper's) when neither holds more.
//!
//! The `iptables` crate runs a program named in its public `cmd` field, so an [`IPTables`]
//! built here names `iptables-legacy` or `iptables-nft` instead of whatever `iptables`
//! points at in the image.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use iptables::IPTables;
use serde::{Deserialize, Serialize};

use super::Error;

/// `iptables.backend`: a backend, or `auto` to use the one the node's rules are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    #[default]
    Auto,
    Legacy,
    Nft,
}

/// An iptables backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
}

/// Chains kubelet creates in the backend it uses (Kubernetes 1.17 and later).
const KUBELET_HINTS: [&str; 2] = [":KUBE-IPTABLES-HINT ", ":KUBE-KUBELET-CANARY "];

/// How long one `*-save` may take before it counts as having nothing to say.
const SAVE_TIMEOUT: Duration = Duration::from_secs(5);

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        }
    }

    /// The program that edits this backend's rules.
    pub fn program(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy",
            Backend::Nft => "iptables-nft",
        }
    }

    /// The program that prints this backend's rules.
    pub fn save_program(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy-save",
            Backend::Nft => "iptables-nft-save",
        }
    }

    /// A handle that runs this backend's program, with `--wait` (queue behind the xtables
    /// lock) and `-C` (both exist in every iptables 1.8, the first with both backends).
    pub(super) fn iptables(self) -> Result<IPTables, Error> {
        let program = self.program();
        let installed = Command::new(program)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !installed {
            return Err(Error {
                action: format!("use the {} backend", self.name()),
                message: format!("{program} is not installed or does not run"),
            });
        }
        Ok(IPTables {
            cmd: program,
            has_check: true,
            has_wait: true,
            // Not numeric: iptables-nft refuses `-S` with `-n`, and the crate would read that
            // as an empty chain.
            is_numeric: false,
        })
    }
}

/// The backend to use and why, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub backend: Backend,
    pub reason: String,
}

/// The configured backend, or with `auto` the one the node's rules are in (reading both
/// backends' rules with `iptables-legacy-save` and `iptables-nft-save`).
pub fn select(choice: BackendChoice) -> Selection {
    let backend = match choice {
        BackendChoice::Legacy => Backend::Legacy,
        BackendChoice::Nft => Backend::Nft,
        BackendChoice::Auto => {
            return detect(
                save(Backend::Legacy).as_deref(),
                save(Backend::Nft).as_deref(),
            );
        }
    };
    Selection {
        backend,
        reason: "set by iptables.backend".to_owned(),
    }
}

/// Decides from the two backends' `*-save` output (`None` where that program is missing or
/// failed).
pub fn detect(legacy: Option<&str>, nft: Option<&str>) -> Selection {
    let hinted = |dump: Option<&str>| {
        dump.unwrap_or_default()
            .lines()
            .find_map(|line| KUBELET_HINTS.iter().find(|hint| line.starts_with(**hint)))
            .map(|hint| hint.trim_start_matches(':').trim_end().to_owned())
    };
    // nft first, as the wrapper does: the commoner case on current nodes.
    for (backend, dump) in [(Backend::Nft, nft), (Backend::Legacy, legacy)] {
        if let Some(chain) = hinted(dump) {
            return Selection {
                backend,
                reason: format!("kubelet's {chain} chain is there"),
            };
        }
    }
    let rules = |dump: Option<&str>| {
        dump.unwrap_or_default()
            .lines()
            .filter(|line| line.starts_with('-'))
            .count()
    };
    let (legacy_rules, nft_rules) = (rules(legacy), rules(nft));
    let backend = if legacy_rules > nft_rules {
        Backend::Legacy
    } else {
        Backend::Nft
    };
    let missing = [(Backend::Legacy, legacy), (Backend::Nft, nft)]
        .iter()
        .filter(|(_, dump)| dump.is_none())
        .map(|(backend, _)| format!("; {} could not be read", backend.save_program()))
        .collect::<String>();
    Selection {
        backend,
        reason: format!(
            "no kubelet hint chain; {legacy_rules} legacy rules, {nft_rules} nft rules{missing}"
        ),
    }
}

/// `PROGRAM` (a `*-save`) output, or `None` if it is missing, fails or hangs. Legacy's is
/// read whole: asking it for one table (`-t mangle`) would create that table.
fn save(backend: Backend) -> Option<String> {
    let mut child = Command::new(backend.save_program())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).map(|_| text)
    });
    let deadline = Instant::now() + SAVE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => {
                tracing::warn!(
                    program = backend.save_program(),
                    "no answer within {SAVE_TIMEOUT:?}; counted as empty"
                );
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    let text = reader.join().ok()?.ok()?;
    status.success().then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBE_PROXY: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n\
        -A PREROUTING -j KUBE-SERVICES\n-A KUBE-SERVICES -j RETURN\nCOMMIT\n";

    #[test]
    fn kubelets_hint_chain_decides() {
        let hinted = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";
        let chosen = detect(Some(hinted), Some(KUBE_PROXY));
        assert_eq!(chosen.backend, Backend::Legacy);
        assert!(chosen.reason.contains("KUBE-IPTABLES-HINT"), "{chosen:?}");
        let canary = "*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n";
        assert_eq!(detect(Some(KUBE_PROXY), Some(canary)).backend, Backend::Nft);
        // Hinted in both (a node mid-migration): nft, as the wrapper does.
        assert_eq!(detect(Some(hinted), Some(canary)).backend, Backend::Nft);
    }

    #[test]
    fn otherwise_the_backend_with_more_rules_wins() {
        let chosen = detect(Some(KUBE_PROXY), Some("*nat\nCOMMIT\n"));
        assert_eq!(chosen.backend, Backend::Legacy);
        assert!(
            chosen.reason.contains("2 legacy rules, 0 nft rules"),
            "{chosen:?}"
        );
        assert_eq!(detect(Some(""), Some(KUBE_PROXY)).backend, Backend::Nft);
    }

    #[test]
    fn nft_when_neither_has_more_or_nothing_can_be_read() {
        assert_eq!(detect(Some(""), Some("")).backend, Backend::Nft);
        let chosen = detect(None, None);
        assert_eq!(chosen.backend, Backend::Nft);
        assert!(
            chosen
                .reason
                .contains("iptables-legacy-save could not be read")
        );
        // Comments and chain headers are not rules.
        let headers = "# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n";
        assert_eq!(detect(Some(headers), Some("")).backend, Backend::Nft);
    }

    #[test]
    fn an_explicit_choice_is_kept() {
        assert_eq!(select(BackendChoice::Legacy).backend, Backend::Legacy);
        assert_eq!(select(BackendChoice::Nft).backend, Backend::Nft);
    }
}
