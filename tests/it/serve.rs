//! `chat serve` as a client sees it: the runner started as a process on loopback, spoken to over
//! plain HTTP, by the official `openai` Python client and by headless Chromium on its chat page.
//! The bundle is the SmolLM2 test bundle of `model.rs` (context 512).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A `chat serve` process, killed when dropped.
pub(crate) struct Served {
    pub(crate) child: Child,
    pub(crate) addr: String,
}

impl Served {
    pub(crate) fn start(bundle: &Path, extra: &[&str]) -> Served {
        let triple = targets::host_triple().expect("a supported host");
        let runner =
            workflow::build_runner(triple, &workflow::root().join("target")).unwrap_or_else(|e| panic!("{e:#}"));
        let mut child = runner
            .command()
            .args(["serve", "--addr", "127.0.0.1:0", "--threads", "2", "--bundle"])
            .arg(bundle)
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("the runner starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the runner prints its address");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split('/').next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        Served { child, addr }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// One request with `Connection: close`; the status and the body.
    pub(crate) fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        let mut s = TcpStream::connect(&self.addr).expect("the server accepts");
        s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        let _ = s.write_all(body); // a server refusing a large body may close before reading it
        let mut raw = vec![];
        let _ = s.read_to_end(&mut raw);
        let raw = String::from_utf8_lossy(&raw).into_owned();
        let status =
            raw.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status in {raw:?}"));
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
        (status, if chunked { dechunk(body) } else { body.to_string() })
    }

    pub(crate) fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.request("POST", path, body.to_string().as_bytes());
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status} {text:?}: {e}")))
    }

    pub(crate) fn health(&self) -> Value {
        let (status, text) = self.request("GET", "/health", b"");
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The payload of a chunked transfer-encoded body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap_or_else(|| panic!("a bad chunk: {body:?}"));
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or_else(|_| panic!("a bad chunk size {size:?}"));
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].strip_prefix("\r\n").expect("CRLF after a chunk");
    }
}

pub(crate) fn served(extra: &[&str]) -> Served {
    let (bundle, _) = crate::model::bundle();
    Served::start(bundle, extra)
}

pub(crate) fn chat(question: &str, extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": question}], "max_tokens": 32, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The `data:` events of a server-sent event stream, parsed (`[DONE]` as a string).
pub(crate) fn events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|d| if d == "[DONE]" { json!("[DONE]") } else { serde_json::from_str(d).unwrap() })
        .collect()
}

/// Chat and text completions, streamed and not, with log-probabilities and stop strings, as
/// the OpenAI API shapes them; a stream carries the same text as the whole answer.
#[test]
fn serve_answers_the_openai_api() {
    let s = served(&[]);
    let (status, models) = s.request("GET", "/v1/models", b"");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["object"], "list");
    let name = models["data"][0]["id"].as_str().unwrap().to_string();

    let (status, r) = s.post(
        "/v1/chat/completions",
        &chat("What is the capital of France?", json!({"model": name, "logprobs": true, "top_logprobs": 3})),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    let content = r["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(content.contains("Paris"), "{content}");
    let lp = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lp.len() as u64, r["usage"]["completion_tokens"].as_u64().unwrap());
    for entry in lp {
        // Greedy: the chosen token is the most likely one, and ln p <= 0, tops in order.
        let top: Vec<f64> =
            entry["top_logprobs"].as_array().unwrap().iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert_eq!(top.len(), 3);
        assert_eq!(entry["logprob"].as_f64().unwrap(), top[0], "{entry}");
        assert!(top.windows(2).all(|w| w[0] >= w[1]) && top[0] <= 0.0, "{entry}");
        assert_eq!(entry["token"], entry["top_logprobs"][0]["token"]);
    }
    let text: String = lp.iter().map(|e| e["token"].as_str().unwrap()).collect();
    assert_eq!(text, content, "the tokens spell the answer");

    let (status, body) = s.request(
        "POST",
        "/v1/chat/completions",
        chat("What is the capital of France?", json!({"stream": true})).to_string().as_bytes(),
    );
    assert_eq!(status, 200);
    let ev = events(&body);
    assert_eq!(ev.last().unwrap(), "[DONE]");
    assert_eq!(ev[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = ev.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, content, "streamed and whole answers differ");
    assert!(ev.len() > 4, "the answer came in one piece: {body}");
    assert_eq!(ev[ev.len() - 2]["choices"][0]["finish_reason"], r["choices"][0]["finish_reason"]);

    // Text completion with a stop string: the text ends before it, finish_reason "stop".
    let (status, c) = s.post(
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "stop": ["."]}),
    );
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["choices"][0]["text"], " Paris");
    assert_eq!(c["choices"][0]["finish_reason"], "stop");
    let (_, c) = s.post(
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0, "logprobs": 2}),
    );
    assert_eq!(c["choices"][0]["finish_reason"], "length");
    assert_eq!(c["usage"]["completion_tokens"], 3);
    assert_eq!(c["choices"][0]["logprobs"]["tokens"].as_array().unwrap().len(), 3);
    assert_eq!(c["choices"][0]["logprobs"]["text_offset"][0], 0);

    // A seed makes sampling repeatable; another seed (almost surely) changes a long answer.
    let sampled = |seed: u64| {
        let body = json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 1.0, "seed": seed, "ignore_eos": true});
        s.post("/v1/completions", &body).1["choices"][0]["text"].as_str().unwrap().to_string()
    };
    assert_eq!(sampled(7), sampled(7));
    assert_ne!(sampled(7), sampled(8));
}

/// Malformed JSON, wrong types, huge bodies, an unknown model, a prompt beyond the context,
/// invalid sampling values: each a 4xx with OpenAI's error object naming the problem, and the
/// server keeps serving.
#[test]
fn bad_requests_get_clear_errors_and_the_server_keeps_serving() {
    let s = served(&["--max-body-bytes", "65536"]);
    let long = "hello ".repeat(600);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("/v1/chat/completions", b"{not json".to_vec(), 400, "not valid JSON"),
        ("/v1/chat/completions", b"[1, 2]".to_vec(), 400, "JSON object"),
        ("/v1/chat/completions", json!({"messages": "hi"}).to_string().into(), 400, "'messages'"),
        ("/v1/chat/completions", json!({"messages": []}).to_string().into(), 400, "must not be empty"),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string().into(),
            400,
            "role",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": 5}]}).to_string().into(),
            400,
            "content",
        ),
        ("/v1/chat/completions", chat("x", json!({"model": "gpt-9"})).to_string().into(), 404, "does not exist"),
        ("/v1/chat/completions", chat("x", json!({"temperature": "hot"})).to_string().into(), 400, "'temperature'"),
        ("/v1/chat/completions", chat("x", json!({"temperature": 7})).to_string().into(), 400, "between 0 and 2"),
        ("/v1/chat/completions", chat("x", json!({"top_p": 0})).to_string().into(), 400, "top_p"),
        ("/v1/chat/completions", chat("x", json!({"max_tokens": 0})).to_string().into(), 400, "max_tokens"),
        ("/v1/chat/completions", chat("x", json!({"max_tokens": -3})).to_string().into(), 400, "max_tokens"),
        ("/v1/chat/completions", chat("x", json!({"n": 2})).to_string().into(), 400, "n = 1"),
        ("/v1/chat/completions", chat("x", json!({"stop": [1]})).to_string().into(), 400, "'stop'"),
        ("/v1/chat/completions", chat("x", json!({"top_logprobs": 3})).to_string().into(), 400, "logprobs"),
        (
            "/v1/chat/completions",
            chat("x", json!({"max_tokens": 100000})).to_string().into(),
            400,
            "maximum context length",
        ),
        ("/v1/chat/completions", chat(&long, json!({})).to_string().into(), 400, "maximum context length"),
        ("/v1/completions", json!({"prompt": 5}).to_string().into(), 400, "'prompt'"),
        ("/v1/completions", json!({"prompt": [99999999]}).to_string().into(), 400, "outside the vocabulary"),
        ("/v1/completions", json!({"prompt": "x", "logprobs": 9}).to_string().into(), 400, "'logprobs'"),
        ("/v1/completions", vec![b'a'; 200_000], 413, "larger than 65536 bytes"),
        ("/v1/nothing", b"{}".to_vec(), 404, "no such endpoint"),
    ];
    for (path, body, want, says) in &cases {
        let (status, text) = s.request("POST", path, body);
        assert_eq!(status, *want, "{path} {}: {text}", String::from_utf8_lossy(&body[..body.len().min(80)]));
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let message = v["error"]["message"].as_str().unwrap_or_else(|| panic!("no error object: {v}"));
        assert!(message.contains(says), "{path}: {message:?} does not say {says:?}");
    }
    let (status, _) = s.request("GET", "/v1/chat/completions", b"");
    assert_eq!(status, 405);
    let health = s.health();
    assert_eq!(health["requests"]["errors"], cases.len() as u64 + 1, "{health}");
    let (status, r) = s.post("/v1/chat/completions", &chat("What is the capital of France?", json!({})));
    assert_eq!(status, 200, "{r}");
    assert!(r["choices"][0]["message"]["content"].as_str().unwrap().contains("Paris"));
}

/// A streaming client that goes away stops its generation: the session is free again long
/// before the tokens it asked for would have been generated.
#[test]
fn a_client_that_disconnects_stops_its_generation() {
    let s = served(&[]);
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "ignore_eos": true, "stream": true});
    let body = body.to_string();
    let mut stream = TcpStream::connect(&s.addr).unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let mut seen = 0;
    let mut line = String::new();
    while seen < 3 {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended early");
        seen += usize::from(line.starts_with("data: "));
    }
    drop(reader); // hang up after three events
    let started = Instant::now();
    let health = loop {
        let h = s.health();
        if h["sessions"]["busy"] == 0 {
            break h;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "the generation never stopped: {h}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(health["requests"]["cancelled"], 1, "{health}");
    assert_eq!(health["requests"]["completed"], 0, "{health}");
    let generated = health["requests"]["generated_tokens"].as_u64().unwrap();
    assert!((3..100).contains(&generated), "{generated} of 400 tokens generated after the client left");
}

/// More clients than sessions at once: everyone is answered (the rest wait), and each answer
/// equals the one the same question gets alone.
#[test]
fn concurrent_clients_share_one_model() {
    let s = served(&["--max-sessions", "2"]);
    let questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?", "Who wrote Hamlet?"];
    let alone: Vec<Value> = questions
        .iter()
        .map(|q| s.post("/v1/chat/completions", &chat(q, json!({}))).1["choices"][0]["message"].clone())
        .collect();
    let together: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = questions
            .iter()
            .map(|q| {
                let s = &s;
                scope.spawn(move || s.post("/v1/chat/completions", &chat(q, json!({}))))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((status, r), want) in together.iter().zip(&alone) {
        assert_eq!(*status, 200, "{r}");
        assert_eq!(&r["choices"][0]["message"], want);
    }
    let health = s.health();
    assert_eq!(health["requests"]["completed"], 2 * questions.len() as u64, "{health}");
    assert!(health["sessions"]["idle"].as_u64().unwrap() <= 2, "{health}");
}

/// The official `openai` Python client: chat completion, streaming, a text completion and two
/// error cases.
#[test]
fn the_openai_python_client_talks_to_serve() {
    let s = served(&[]);
    let out = Command::new(tests::harness::python())
        .arg(tests::harness::peer_script("openai_client.py"))
        .arg(s.url())
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "openai_client.py failed (is openai installed? `cargo xtask test` installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let answer = v["chat"]["content"].as_str().unwrap();
    assert!(answer.contains("Paris"), "{v}");
    assert_eq!(v["chat"]["role"], "assistant");
    assert_eq!(v["stream"]["content"], v["chat"]["content"], "{v}");
    assert!(v["stream"]["pieces"].as_u64().unwrap() > 1, "{v}");
    assert_eq!(v["stream"]["usage"]["completion_tokens"], v["chat"]["usage"]["completion_tokens"], "{v}");
    assert_eq!(v["stream"]["finish_reason"], v["chat"]["finish_reason"]);
    assert_eq!(v["completion"]["text"], " Paris");
    let logprobs = v["chat"]["logprobs"].as_array().unwrap();
    assert_eq!(logprobs.len() as u64, v["chat"]["usage"]["completion_tokens"].as_u64().unwrap());
    assert_eq!(v["unknown_model"]["status"], 404, "{v}");
    assert_eq!(v["bad_top_p"]["status"], 400, "{v}");
}

/// The chat page in a real browser: headless Chromium (driven over the DevTools protocol by
/// `tests/peer/chromium_page.py`) loads `/?q=...`, the page sends the question, writes the
/// streamed answer into the page and marks itself done.
#[test]
fn the_chat_page_streams_an_answer_in_a_browser() {
    let Some(browser) = crate::eval::chromium() else {
        tests::harness::not_run(
            "serve::the_chat_page_streams_an_answer_in_a_browser",
            "headless Chromium is not installed (apt-get install chromium)",
        );
        return;
    };
    let s = served(&[]);
    let url = format!("{}/?q=What%20is%20the%20capital%20of%20France%3F", s.url());
    let out = Command::new(tests::harness::python())
        .arg(tests::harness::peer_script("chromium_page.py"))
        .args([url.as_str(), "240"])
        .arg(&browser)
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "chromium_page.py: {}", String::from_utf8_lossy(&out.stderr));
    let page: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(page["status"], "done", "{page}");
    let turns = page["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 2, "{page}");
    assert_eq!(turns[0][1], "What is the capital of France?");
    assert!(turns[1][0].as_str().unwrap().contains("assistant"), "{page}");
    assert!(turns[1][1].as_str().unwrap().contains("Paris"), "{page}");
    let health = s.health();
    assert_eq!(health["requests"]["completed"], 1, "{health}");
}

/// `cargo xtask serve-load`, bounded: every request answered with the tokens asked for at
/// each level, and the server's memory flat once its sessions exist (more clients than
/// sessions wait; they do not add caches).
#[test]
fn serve_load_answers_every_request_with_flat_memory() {
    let (bundle, _) = crate::model::bundle();
    let cmd = workflow::serve_load::ServeLoadCmd {
        bundle: bundle.clone(),
        clients: vec![2, 6],
        requests: 6,
        max_tokens: 8,
        max_sessions: 2,
        threads: 1,
        json: None,
        force: false,
        url: None,
        server_pid: None,
        api_key: None,
    };
    let levels = workflow::serve_load::serve_load(&cmd).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(levels.len(), 2);
    for l in &levels {
        assert_eq!((l.requests, l.errors, l.busy, l.tokens), (6, 0, 0, 48), "{l:?}");
        assert!(l.tokens_per_second() > 0.0 && l.latency(0.95) >= l.latency(0.5));
    }
    let (a, b) = (levels[0].server_rss_bytes.unwrap(), levels[1].server_rss_bytes.unwrap());
    assert!(b <= a + (8 << 20), "server memory grew from {a} to {b} bytes with more clients than sessions");
}
