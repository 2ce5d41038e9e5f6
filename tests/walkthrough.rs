//! The README's "Try it", as a newcomer meets it: a fresh clone of this commit (HEAD: commit
//! what you want tested), the README's run command, then every command of the walkthrough with
//! the output the README promises for it. Stopping the script must stop everything it started:
//! SIGTERM to the script, and in a second run Ctrl-C (SIGINT to its process group, as a
//! terminal sends it). It all runs in a network namespace of its own, so the fixed ports (5000,
//! 8181, 8182) are the test's alone, and "nothing left" means no process in that namespace.
//!
//! The clone gets the repository's `.peers` (the Python peers) by a symlink, as worktrees do:
//! installing them needs the network, which the namespace does not have. Its build goes to
//! ~/.cache/iamlet/walkthrough-target (or $IAMLET_CACHE's), so only the first run builds the
//! dependencies.

mod support;

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use support::netns::Netns;
use support::repo;

/// One command of the walkthrough and what the README says it prints.
#[derive(Debug)]
struct Step {
    command: String,
    expected: String,
}

/// The "Try it" section's code blocks: the run command, and the walkthrough as steps (commands
/// with no promised output, like `export`, are carried into every later step).
fn try_it(readme: &str) -> (String, Vec<String>, Vec<Step>) {
    let section = readme
        .split("\n## ")
        .find(|section| section.starts_with("Try it"))
        .expect("README has a \"Try it\" section");
    let blocks: Vec<&str> = section
        .split("```sh\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap_or_default())
        .collect();
    assert!(
        blocks.len() >= 2,
        "Try it has a run block and a walkthrough"
    );
    let run = blocks[0].trim().to_owned();
    let mut prelude = Vec::new();
    let mut steps: Vec<Step> = Vec::new();
    let mut command = String::new();
    for line in blocks[1].lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            if !command.is_empty() {
                // "demo-web   (127.0.0.2 is …)": the note is for the reader.
                let expected = comment.split("   (").next().unwrap_or(comment).trim();
                steps.push(Step {
                    command: std::mem::take(&mut command),
                    expected: expected.to_owned(),
                });
            }
            continue;
        }
        if !command.is_empty() && !command.ends_with("\\\n") {
            prelude.push(std::mem::take(&mut command));
        }
        command.push_str(line);
        command.push('\n');
    }
    if !command.is_empty() {
        prelude.push(command);
    }
    (run, prelude, steps)
}

/// A run of the script in the namespace, its output in `log`. Whatever is left in the
/// namespace is killed on drop, so a failing test leaves nothing behind either.
struct Run<'a> {
    ns: &'a Netns,
    child: Child,
    log: PathBuf,
}

impl<'a> Run<'a> {
    fn start(ns: &'a Netns, clone: &Path, run: &str, log: PathBuf) -> Run<'a> {
        let cache = std::env::var_os("IAMLET_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(std::env::temp_dir)
                    .join(".cache/iamlet")
            });
        let target = cache.join("walkthrough-target");
        let out = File::create(&log).expect("log");
        // The command's own words, so that the pid is the script's (no shell in between).
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(run.split_whitespace())
            .current_dir(clone)
            .env("CARGO_TARGET_DIR", target)
            .env("CARGO_TERM_COLOR", "never")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            // Its own process group, as a shell's foreground job is: Ctrl-C goes to it all.
            .process_group(0)
            .spawn()
            .expect("start the run command");
        Run { ns, child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the script to say iamlet is ready (the first build may take many minutes).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(40 * 60);
        while Instant::now() < deadline {
            if self.log().contains("run.sh: iamlet is ready") {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!(
                    "the script exited ({status}) before iamlet was ready:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("iamlet was not ready within 40 minutes:\n{}", self.log());
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the script did not end within 60 s of the signal:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        let _ = killpg(self.pid(), Signal::SIGKILL);
        for pid in pids_in(self.ns) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// The processes in the namespace.
fn pids_in(ns: &Netns) -> Vec<i32> {
    let out = Command::new("ip")
        .args(["netns", "pids", &ns.name])
        .output()
        .expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

/// Asserts that nothing the script started is left: no process in the namespace, and nothing
/// listening on the STS's, iamlet's or the admin port.
fn nothing_left(ns: &Netns, run: &Run) {
    let left = pids_in(ns);
    assert!(left.is_empty(), "left running: {left:?}\n{}", run.log());
    let listening: Vec<u16> = ns.enter(|| {
        [5000, 8181, 8182]
            .into_iter()
            .filter(|port| std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok())
            .collect()
    });
    assert!(listening.is_empty(), "still listening on {listening:?}");
}

#[test]
fn the_readme_walkthrough_works_from_a_fresh_clone_and_stops_cleanly() {
    require_netns!();
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README");
    let (run, prelude, steps) = try_it(&readme);
    assert_eq!(run, "bash deploy/local/run.sh");
    assert!(steps.len() >= 4, "{steps:?}");

    let work = tempfile::tempdir().expect("tempdir");
    let clone = work.path().join("iamlet");
    let out = Command::new("git")
        .args(["clone", "--quiet"])
        .arg(repo())
        .arg(&clone)
        .output()
        .expect("git clone");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peers = repo().join(".peers");
    assert!(
        peers.join("venv/bin/moto_server").exists(),
        "run `bash .ci/setup` first"
    );
    std::os::unix::fs::symlink(&peers, clone.join(".peers")).expect("link .peers");

    let ns = Netns::create();
    let mut first = Run::start(&ns, &clone, &run, work.path().join("run-1.log"));
    first.wait_ready();
    let log = first.log();
    // It said what it was doing, in order: build first, then the STS, checked, then iamlet.
    let said = [
        "run.sh: building iamlet",
        "run.sh: the local STS answers on 127.0.0.1:5000",
        "run.sh: starting iamlet",
        "run.sh: iamlet is ready",
    ];
    let positions: Vec<Option<usize>> = said.iter().map(|line| log.find(line)).collect();
    assert!(
        positions.iter().all(Option::is_some) && positions.is_sorted(),
        "progress not said in order:\n{log}"
    );
    assert!(!log.contains("No such file"), "{log}");

    for step in &steps {
        let script = format!("{}{}", prelude.concat(), step.command);
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name, "bash", "-c", &script])
            .current_dir(&clone)
            .output()
            .expect("run a walkthrough command");
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let context = format!(
            "{}\nstdout: {stdout}\nstderr: {}",
            step.command,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{context}");
        if stdout.lines().count() == 1 {
            assert_eq!(stdout, step.expected, "{context}");
        } else {
            assert!(stdout.contains(&step.expected), "{context}");
        }
    }

    // SIGTERM to the script alone: it must stop iamlet and the STS and wait for them.
    kill(first.pid(), Signal::SIGTERM).expect("SIGTERM");
    let status = first.wait_exit();
    assert_eq!(status.code(), Some(143), "{}", first.log());
    nothing_left(&ns, &first);
    assert!(
        first.log().contains("stopped"),
        "iamlet did not drain:\n{}",
        first.log()
    );
    drop(first);

    // Ctrl-C: SIGINT to the whole process group.
    let mut second = Run::start(&ns, &clone, &run, work.path().join("run-2.log"));
    second.wait_ready();
    killpg(second.pid(), Signal::SIGINT).expect("SIGINT");
    let status = second.wait_exit();
    assert_eq!(status.code(), Some(130), "{}", second.log());
    nothing_left(&ns, &second);
}

#[test]
fn walkthrough_parsing_finds_commands_and_promises() {
    let readme = "# x\n\n## Try it (no AWS)\n\n```sh\nbash run.sh\n```\n\ntext\n\n```sh\n\
                  curl a\n# out-a\nexport X=1   # why\nlong \\\n  line\n# \"k\": \"v\"\n\
                  curl b\n# b-out   (a note)\n```\n\n## Next\n```sh\nnot this\n# no\n```\n";
    let (run, prelude, steps) = try_it(readme);
    assert_eq!(run, "bash run.sh");
    assert_eq!(prelude, vec!["export X=1   # why\n".to_owned()]);
    let pairs: Vec<(&str, &str)> = steps
        .iter()
        .map(|s| (s.command.as_str(), s.expected.as_str()))
        .collect();
    assert_eq!(
        pairs,
        vec![
            ("curl a\n", "out-a"),
            ("long \\\n  line\n", "\"k\": \"v\""),
            ("curl b\n", "b-out"),
        ]
    );
}
