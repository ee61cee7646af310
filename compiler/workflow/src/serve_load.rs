//! `cargo xtask serve-load`: a bounded load test of `chat serve` on loopback — throughput and
//! latency at several numbers of concurrent clients, errors counted, and the server's resident
//! memory after each level (it must stay flat: sessions are capped, requests beyond them wait).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};

/// Options of `cargo xtask serve-load`.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeLoadCmd {
    /// The bundle to serve.
    #[arg(long, default_value = "bundles/x86_64-unknown-linux-gnu")]
    pub bundle: PathBuf,
    /// Load a server that is already running at this base URL (http://host:port, any
    /// OpenAI-compatible server) instead of serving --bundle; its memory is then read from
    /// --server-pid when given.
    #[arg(long)]
    pub url: Option<String>,
    /// The process id of the --url server, for its resident memory.
    #[arg(long, requires = "url")]
    pub server_pid: Option<u32>,
    /// The API key the --url server wants (sent as a bearer token).
    #[arg(long, requires = "url")]
    pub api_key: Option<String>,
    /// Concurrent clients, one level each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub clients: Vec<usize>,
    /// Requests per level (spread over its clients).
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// Tokens generated per request (end-of-turn ignored, so every request does the same work).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// The server's sessions.
    #[arg(long, default_value_t = 4)]
    pub max_sessions: usize,
    /// The server's threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Also write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Replace an existing --json file.
    #[arg(long)]
    pub force: bool,
}

/// One level of concurrency.
#[derive(Clone, Debug)]
pub struct Level {
    pub clients: usize,
    pub requests: usize,
    /// Requests that failed other than by 503 (a server at capacity says so; those are `busy`).
    pub errors: usize,
    /// Requests answered 503 (every session and queue place taken, or the queue timed out).
    pub busy: usize,
    pub tokens: u64,
    pub seconds: f64,
    pub latencies: Vec<f64>,
    /// The server's resident memory after the level.
    pub server_rss_bytes: Option<u64>,
}

impl Level {
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }

    pub fn latency(&self, quantile: f64) -> f64 {
        let mut t = self.latencies.clone();
        t.sort_by(f64::total_cmp);
        t.get(((t.len().max(1) - 1) as f64 * quantile).round() as usize).copied().unwrap_or(0.0)
    }

    fn json(&self) -> Value {
        json!({"clients": self.clients, "requests": self.requests, "errors": self.errors, "busy": self.busy,
            "tokens": self.tokens,
            "seconds": self.seconds, "tokens_per_second": self.tokens_per_second(),
            "latency_seconds": {"median": self.latency(0.5), "p95": self.latency(0.95)},
            "server_rss_bytes": self.server_rss_bytes})
    }
}

fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn serve_load(c: &ServeLoadCmd) -> Result<Vec<Level>> {
    if let Some(out) = &c.json {
        runtime::cli::check_output_file(out, c.force)?;
    }
    if c.clients.iter().any(|&n| n == 0) || c.requests == 0 || c.max_tokens == 0 {
        bail!("--clients, --requests and --max-tokens must be at least 1");
    }
    let served = match &c.url {
        Some(_) => None,
        None => Some(crate::offload_eval::serve_bundle(
            &c.bundle,
            c.threads,
            &["--max-sessions", &c.max_sessions.to_string(), "--max-queue", "1024"],
        )?),
    };
    let base = match (&served, &c.url) {
        (Some(s), _) => s.url.clone(),
        (None, Some(u)) => u.trim_end_matches('/').to_string(),
        (None, None) => unreachable!("served when no --url"),
    };
    let pid = served.as_ref().map(crate::offload_eval::Served::pid).or(c.server_pid);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(600)))
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("{base}/v1/completions");
    // Ok(tokens), Err(true) for a 503, Err(false) for any other failure.
    let ask = |i: usize| -> Result<u64, bool> {
        let body = json!({"prompt": format!("Story {i}: once upon a time"), "max_tokens": c.max_tokens,
            "temperature": 0, "ignore_eos": true});
        let mut request = agent.post(&url).header("Content-Type", "application/json");
        if let Some(key) = &c.api_key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        let mut r = request.send(body.to_string()).map_err(|_| false)?;
        match r.status().as_u16() {
            200 => {}
            503 => return Err(true),
            _ => return Err(false),
        }
        let v: Value = serde_json::from_str(&r.body_mut().read_to_string().map_err(|_| false)?).map_err(|_| false)?;
        v["usage"]["completion_tokens"].as_u64().ok_or(false)
    };
    let _ = ask(0); // warm up: the first session and the pages of the weights
    let mut levels = vec![];
    for &clients in &c.clients {
        let next = AtomicUsize::new(0);
        let bar = runtime::cli::progress(c.requests as u64, &format!("{clients} clients"));
        let started = Instant::now();
        let results: Vec<(f64, Result<u64, bool>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..clients)
                .map(|_| {
                    scope.spawn(|| {
                        let mut mine = vec![];
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= c.requests {
                                return mine;
                            }
                            let t = Instant::now();
                            let tokens = ask(i);
                            mine.push((t.elapsed().as_secs_f64(), tokens));
                            bar.inc(1);
                        }
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
        });
        let seconds = started.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let level = Level {
            clients,
            requests: results.len(),
            errors: results.iter().filter(|r| r.1 == Err(false)).count(),
            busy: results.iter().filter(|r| r.1 == Err(true)).count(),
            tokens: results.iter().filter_map(|r| r.1.ok()).sum(),
            seconds,
            latencies: results.iter().map(|r| r.0).collect(),
            server_rss_bytes: pid.and_then(rss_of),
        };
        eprintln!(
            "{clients:>3} clients: {} requests, {} errors, {} busy (503), {:.1} tok/s",
            level.requests,
            level.errors,
            level.busy,
            level.tokens_per_second()
        );
        levels.push(level);
    }
    println!(
        "{:>8} {:>9} {:>7} {:>6} {:>10} {:>8} {:>8} {:>11}",
        "clients", "requests", "errors", "503s", "tok/s", "p50 s", "p95 s", "server MiB"
    );
    for l in &levels {
        let rss = l.server_rss_bytes.map_or("-".to_string(), |b| format!("{:.1}", b as f64 / 1048576.0));
        println!(
            "{:>8} {:>9} {:>7} {:>6} {:>10.1} {:>8.2} {:>8.2} {:>11}",
            l.clients,
            l.requests,
            l.errors,
            l.busy,
            l.tokens_per_second(),
            l.latency(0.5),
            l.latency(0.95),
            rss
        );
    }
    if let Some(path) = &c.json {
        let v = json!({"bundle": c.bundle.display().to_string(), "url": c.url, "max_tokens": c.max_tokens,
            "max_sessions": c.max_sessions, "threads": c.threads,
            "levels": levels.iter().map(Level::json).collect::<Vec<_>>()});
        crate::evaluate::write_new(path, &(serde_json::to_string_pretty(&v)? + "\n"), c.force)?;
        println!("wrote {}", path.display());
    }
    Ok(levels)
}
