//! Memory and API traffic against cluster size (issue 11, target 4).
//!
//! A fake API server (tests/support/fake_kube.rs, paging lists and honouring the agent's
//! `spec.nodeName` field selector as a real one does) holds 250 pods on node-1 and 1k, 10k or
//! 50k pods on other nodes, each as a real Deployment pod looks (~4 KB of JSON). For each
//! size, `iamlet agent` for node-1 is started, and once `/readyz` says ready (lists in, every
//! identity fetched) and 2 s have passed, its VmRSS and VmHWM are read from /proc and the bytes
//! of list and watch bodies the fake sent it are counted. Then `iamlet server` (cluster-wide)
//! the same way. The baseline, in the same run, is the agent with no pods at all.
//!
//! Draws docs/bench/rss.svg (RSS against cluster size).
//!
//! Run: `cargo bench --bench scale_memory` (about a minute).

#[path = "scale/mod.rs"]
mod scale;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use plotters::style::RGBColor;
use scale::plot::{Series, rss_against_cluster_size};
use scale::{Kind, MIB, Process, fake_sts::FakeSts, load_cluster};
use support::fake_kube::FakeKube;

const ON_NODE: usize = 250;
const SIZES: [usize; 3] = [1_000, 10_000, 50_000];
const SETTLE: Duration = Duration::from_secs(2);
/// Enough STS rate that the server's identities are fetched in one round.
const EXTRA: &str = "[credentials]\nsts_qps = 1000.0\nsts_burst = 1000\n";

#[derive(Debug, Clone, Copy)]
struct Sample {
    rss: u64,
    hwm: u64,
    anon: u64,
    file: u64,
    threads: u64,
    bytes: u64,
    ready_ms: f64,
}

fn measure(
    runtime: &tokio::runtime::Runtime,
    kind: Kind,
    kube: &FakeKube,
    sts: &FakeSts,
) -> Sample {
    let before = kube.bytes_sent();
    let mut iamlet = Process::start(kind, kube, &sts.url(), EXTRA);
    let ready =
        runtime.block_on(iamlet.wait_ready(Duration::from_millis(20), Duration::from_secs(180)));
    std::thread::sleep(SETTLE);
    let memory = iamlet.memory();
    let bytes = kube.bytes_sent() - before;
    iamlet.stop();
    Sample {
        rss: memory.rss,
        hwm: memory.hwm,
        anon: memory.anon,
        file: memory.file,
        threads: memory.threads,
        bytes,
        ready_ms: scale::ms(ready),
    }
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let sts = FakeSts::start(Duration::from_millis(20));

    let empty = FakeKube::start();
    load_cluster(&empty, 0, 0);
    let baseline = measure(&runtime, Kind::Agent, &empty, &sts);

    let mut agent = Vec::new();
    let mut server = Vec::new();
    for size in SIZES {
        let kube = FakeKube::start();
        load_cluster(&kube, ON_NODE, size);
        agent.push(measure(&runtime, Kind::Agent, &kube, &sts));
        server.push(measure(&runtime, Kind::Server, &kube, &sts));
    }

    println!("machine: {}", scale::machine());
    println!(
        "{:30} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>12} {:>8}",
        "MiB", "VmRSS", "VmHWM", "anon", "file", "threads", "vs base", "API bytes", "ready ms"
    );
    let row = |name: String, s: &Sample| {
        println!(
            "{name:30} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>7} {:>8.2} {:>12} {:>8.0}",
            s.rss as f64 / MIB,
            s.hwm as f64 / MIB,
            s.anon as f64 / MIB,
            s.file as f64 / MIB,
            s.threads,
            s.rss as f64 / baseline.rss as f64,
            s.bytes,
            s.ready_ms,
        );
    };
    row("baseline: agent, no pods".into(), &baseline);
    for (size, a) in SIZES.iter().zip(&agent) {
        row(format!("agent, 250 + {size} elsewhere"), a);
    }
    for (size, s) in SIZES.iter().zip(&server) {
        row(format!("server, {} pods", size + ON_NODE), s);
    }
    let spread = |values: Vec<f64>| {
        let (lo, hi) = values
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        let mid = (lo + hi) / 2.0;
        (hi - lo) / 2.0 / mid * 100.0
    };
    println!(
        "agent RSS across sizes: within ±{:.1} % of its middle; API bytes within ±{:.1} %",
        spread(agent.iter().map(|a| a.rss as f64).collect()),
        spread(agent.iter().map(|a| a.bytes as f64).collect()),
    );
    let pods = |i: usize| (SIZES[i] + ON_NODE) as f64;
    let last = SIZES.len() - 1;
    println!(
        "server: marginal {:.0} B of RSS per pod from {} to {} pods ({:.0} B of API body per pod)",
        (server[last].rss as f64 - server[1].rss as f64) / (pods(last) - pods(1)),
        pods(1),
        pods(last),
        (server[last].bytes as f64 - server[1].bytes as f64) / (pods(last) - pods(1)),
    );

    let points = |samples: &[Sample], pick: fn(&Sample) -> u64| -> Vec<(f64, f64)> {
        samples
            .iter()
            .enumerate()
            .map(|(i, s)| (pods(i), pick(s) as f64 / MIB))
            .collect()
    };
    let blue = RGBColor(31, 119, 180);
    let orange = RGBColor(230, 120, 20);
    let series = [
        Series {
            name: "agent VmRSS (250 pods on its node)".into(),
            color: blue,
            dashed: false,
            points: points(&agent, |s| s.rss),
        },
        Series {
            name: "agent VmHWM (peak)".into(),
            color: blue,
            dashed: true,
            points: points(&agent, |s| s.hwm),
        },
        Series {
            name: "server VmRSS (every pod)".into(),
            color: orange,
            dashed: false,
            points: points(&server, |s| s.rss),
        },
        Series {
            name: "server VmHWM (peak)".into(),
            color: orange,
            dashed: true,
            points: points(&server, |s| s.hwm),
        },
    ];
    let path = scale::repo().join("docs/bench/rss.svg");
    std::fs::create_dir_all(path.parent().expect("dir")).expect("docs/bench");
    rss_against_cluster_size(
        &path,
        "iamlet RSS against cluster size",
        (0.0, pods(last) * 1.1),
        &series,
        &[
            ("agent target", 24.0, RGBColor(120, 160, 220)),
            ("server target", 64.0, RGBColor(240, 170, 110)),
            (
                "baseline: agent with no pods",
                baseline.rss as f64 / MIB,
                RGBColor(150, 150, 150),
            ),
        ],
    )
    .expect("plot");
    println!("drawn: {}", path.display());
}
