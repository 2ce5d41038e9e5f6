//! What the load benchmarks share: the floor's process, a measuring window, runs (throughput
//! and every latency), the median of interleaved rounds, the machine they ran on, and the
//! picture of latency by percentile, drawn as SVG.
#![allow(dead_code)] // Each benchmark uses a different part.

use std::future::Future;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use plotters::prelude::*;

/// A floor server: the benchmark's own binary run again with `flag` and its arguments, in a
/// process of its own like the server it is compared with. It ends when dropped, and on its own
/// when the benchmark goes (see [`exit_with_benchmark`]).
pub struct Floor {
    pub addr: SocketAddr,
    child: Child,
}

impl Floor {
    /// Starts the floor on a free loopback port, passed as the first argument after `flag`.
    pub fn start(flag: &str, args: &[&std::ffi::OsStr]) -> Floor {
        let port = crate::support::free_port();
        let child = Command::new(std::env::current_exe().expect("self"))
            .args([flag, &port.to_string()])
            .args(args)
            .stdin(Stdio::piped())
            .spawn()
            .expect("floor server");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        assert!(crate::support::wait_for_port(addr, Duration::from_secs(10)));
        Floor { addr, child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// In a floor's process: exits once the benchmark that started it is gone (its stdin closes).
pub fn exit_with_benchmark() {
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
}

/// When a run warms up, measures, and stops.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    measure_from: Instant,
    stop: Instant,
    measure: Duration,
}

impl Window {
    pub fn new(warm_up: Duration, measure: Duration) -> Window {
        let measure_from = Instant::now() + warm_up;
        Window {
            measure_from,
            stop: measure_from + measure,
            measure,
        }
    }

    /// Whether an operation may start at `now`.
    pub fn open(&self, now: Instant) -> bool {
        now < self.stop
    }

    /// Keeps the latency of an operation started at `sent`, if it started while measuring.
    pub fn keep(&self, sent: Instant, latencies: &mut Vec<u32>) {
        if sent >= self.measure_from {
            let nanos = sent.elapsed().as_nanos();
            latencies.push(u32::try_from(nanos).unwrap_or(u32::MAX));
        }
    }
}

/// One run: every latency measured (sorted, in nanoseconds, at most ~4.3 s) over the window,
/// and the CPU time the server spent meanwhile.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub latencies: Vec<u32>,
    pub seconds: f64,
    pub server_cpu: Duration,
}

impl Run {
    /// Operations per second.
    pub fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.seconds
    }

    /// The server's CPU time (user and system, all threads) per operation, in microseconds:
    /// what an operation costs the server, whatever else runs on the machine.
    pub fn cpu_us(&self) -> f64 {
        self.server_cpu.as_secs_f64() * 1e6 / self.latencies.len().max(1) as f64
    }

    /// The latency at quantile `q` (0.5 for the median), in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let at = ((self.latencies.len() as f64 * q) as usize).min(self.latencies.len() - 1);
        f64::from(self.latencies[at]) / 1e3
    }
}

/// Runs `workers` (each a loop of operations over `window`, returning its latencies) at once
/// against the server process `server`, and gathers them into one run.
pub async fn drive<F>(window: Window, server: u32, workers: impl IntoIterator<Item = F>) -> Run
where
    F: Future<Output = Vec<u32>> + Send + 'static,
{
    let tasks: Vec<_> = workers.into_iter().map(tokio::spawn).collect();
    let measure_from = tokio::time::Instant::from_std(window.measure_from);
    tokio::time::sleep_until(measure_from).await;
    let cpu_before = cpu_time(server);
    tokio::time::sleep_until(measure_from + window.measure).await;
    let server_cpu = cpu_time(server).saturating_sub(cpu_before);
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("load worker"));
    }
    latencies.sort_unstable();
    Run {
        latencies,
        seconds: window.measure.as_secs_f64(),
        server_cpu,
    }
}

/// The CPU time process `pid` has had, all threads (from the scheduler's own accounting, in
/// nanoseconds: `/proc/PID/task/*/schedstat`). Threads that ended are not counted: the
/// servers here keep theirs.
pub fn cpu_time(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let nanos: u64 = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(nanos)
}

/// The run of median throughput.
pub fn median(runs: &[Run]) -> &Run {
    let mut sorted: Vec<&Run> = runs.iter().collect();
    sorted.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    sorted[sorted.len() / 2]
}

fn median_of(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A target's runs against the floor's, round by round: medians over the rounds, and ratios
/// taken within each round (the two ran back to back) before their median is taken, so that
/// the machine's drift between rounds cancels out.
#[derive(Debug, Clone, Copy)]
pub struct Compared {
    pub rate: f64,
    pub cpu_us: f64,
    pub cpu_ratio: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub rate_ratio: f64,
    pub p99_ratio: f64,
    pub p999_ratio: f64,
}

/// `runs` against `floor`, one run of each per round.
pub fn compare(runs: &[Run], floor: &[Run]) -> Compared {
    let each = |f: &dyn Fn(&Run) -> f64| median_of(runs.iter().map(f).collect());
    let paired = |f: &dyn Fn(&Run) -> f64| {
        median_of(runs.iter().zip(floor).map(|(r, fl)| f(r) / f(fl)).collect())
    };
    Compared {
        rate: each(&Run::rate),
        cpu_us: each(&Run::cpu_us),
        cpu_ratio: paired(&Run::cpu_us),
        p50_us: each(&|r| r.quantile_us(0.50)),
        p99_us: each(&|r| r.quantile_us(0.99)),
        p999_us: each(&|r| r.quantile_us(0.999)),
        rate_ratio: paired(&Run::rate),
        p99_ratio: paired(&|r| r.quantile_us(0.99)),
        p999_ratio: paired(&|r| r.quantile_us(0.999)),
    }
}

/// A Markdown table of `targets` (name, runs) against the first one's runs.
pub fn table(unit: &str, targets: &[(&str, &[Run])]) -> String {
    let floor = targets[0].1;
    let mut table = format!(
        "| target | {unit} | p50 µs | p99 µs | p99.9 µs | server CPU µs/op | throughput vs floor | p99 vs floor | p99.9 vs floor | server CPU vs floor |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for (name, runs) in targets {
        let c = compare(runs, floor);
        table.push_str(&format!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            c.rate,
            c.p50_us,
            c.p99_us,
            c.p999_us,
            c.cpu_us,
            c.rate_ratio,
            c.p99_ratio,
            c.p999_ratio,
            c.cpu_ratio
        ));
    }
    table
}

/// `nproc` and the CPU model, for the record.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{cpus} CPUs ({model})")
}

/// Today's date (UTC), for the record.
pub fn today() -> String {
    use iamlet::clock::Clock;
    let now = iamlet::imds::timestamp(iamlet::clock::SystemClock.now());
    now[..10].to_owned()
}

/// One line of a panel: a name, its colour, and its run.
pub struct Curve<'a> {
    pub name: &'a str,
    pub color: RGBColor,
    pub run: &'a Run,
}

/// One panel: a title and its curves.
pub struct Panel<'a> {
    pub title: &'a str,
    pub curves: Vec<Curve<'a>>,
}

pub const FLOOR: RGBColor = RGBColor(120, 120, 120);
pub const FIRST: RGBColor = RGBColor(31, 119, 180);
pub const SECOND: RGBColor = RGBColor(214, 39, 40);
pub const THIRD: RGBColor = RGBColor(44, 160, 44);

/// The deepest percentile drawn: 99.99 %.
const NINES: f64 = 4.0;

/// Latency by percentile, one panel per scenario side by side, as SVG at `path`. The x axis is
/// in nines (50 %, 90 %, 99 %, 99.9 %, 99.99 %) so that the tail, where the floor and iamlet
/// part, gets as much room as the median.
pub fn percentile_plot(
    path: &Path,
    title: &str,
    panels: &[Panel<'_>],
) -> Result<(), Box<dyn std::error::Error>> {
    let width = 420 * panels.len() as u32;
    let root = SVGBackend::new(path, (width, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let areas = root.split_evenly((1, panels.len()));
    for (area, panel) in areas.iter().zip(panels) {
        let top = panel
            .curves
            .iter()
            .map(|c| c.run.quantile_us(1.0 - 10f64.powf(-NINES)))
            .fold(0.0f64, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..NINES, 0.0..top.max(1.0))?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (µs)")
            .x_labels(5)
            .x_label_formatter(&|nines| {
                let q = format!("{:.2}", 100.0 * (1.0 - 10f64.powf(-nines)));
                format!("{}%", q.trim_end_matches('0').trim_end_matches('.'))
            })
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        for curve in &panel.curves {
            let color = curve.color;
            let points: Vec<(f64, f64)> = (0..=400)
                .map(|i| {
                    let nines = NINES * f64::from(i) / 400.0;
                    (nines, curve.run.quantile_us(1.0 - 10f64.powf(-nines)))
                })
                .collect();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(curve.name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
