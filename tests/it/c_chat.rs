//! `examples/c-chat`, a C11 program on the runtime's C API (`runtime/include/kiln.h`),
//! compiled with `cc -Wall -Wextra -Werror` against a bundle whose weights ship as
//! `weights.bin`, exactly as `cargo xtask c-chat` builds it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use compiler::bundle::{build_model, BuildOptions, WeightsPlacement};
use tests::harness::scratch_dir;

const PROMPT: &str = "What is the capital of France?";

fn model_path() -> PathBuf {
    std::env::var_os("KILN_MODEL").map(PathBuf::from).expect(
        "set KILN_MODEL to a SmolLM2-135M-Instruct GGUF (e.g. the path printed by \
         `cargo xtask fetch-model`) to run the c-chat tests",
    )
}

/// The bundle (weights in weights.bin) and the c-chat binary linked against it, built once.
fn app() -> &'static (PathBuf, PathBuf) {
    static APP: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    APP.get_or_init(|| {
        let bundle = scratch_dir("c-chat").keep().join("bundle");
        let opts = BuildOptions {
            context: Some(512),
            batch: 64,
            weights: WeightsPlacement::File,
            ..BuildOptions::new(model_path(), "x86_64-unknown-linux-gnu", bundle.clone())
        };
        build_model(&opts, &mut |_| {}).unwrap_or_else(|e| panic!("build failed: {e}"));
        assert!(bundle.join("weights.bin").exists(), "a bundle built without embedded weights has weights.bin");
        // A target dir of its own: the outer `cargo test` holds the main one's lock.
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kiln-tests/apps");
        let exe = workflow::runner::build_c_chat(&bundle, Some(&target))
            .unwrap_or_else(|e| panic!("building examples/c-chat failed: {e:#}"));
        (bundle, exe)
    })
}

fn run(exe: &Path, bundle: &Path, prompt: &str) -> Output {
    let out = Command::new(exe)
        .arg(bundle)
        .arg(prompt)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    eprintln!(
        "c-chat exited with {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Copies a directory tree, leaving out files named `skip`.
fn copy_tree(from: &Path, to: &Path, skip: &str) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&src, &dst, skip);
        } else if entry.file_name() != skip {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

#[test]
fn c_program_chats_through_the_c_abi() {
    let (bundle, exe) = app();
    let out = run(exe, bundle, PROMPT);
    assert!(out.status.success(), "c-chat failed: {}", out.status);
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(reply.contains("Paris"), "reply does not name Paris: {reply:?}");
}

#[test]
fn c_program_reports_missing_weights() {
    let (bundle, exe) = app();
    let scratch = scratch_dir("c-chat-no-weights");
    let broken = scratch.join("bundle");
    copy_tree(bundle, &broken, "weights.bin");
    assert!(!broken.join("weights.bin").exists());
    let out = run(exe, &broken, PROMPT);
    assert!(!out.status.success(), "c-chat succeeded without weights.bin");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("weights"), "stderr does not mention the weights: {stderr:?}");
    assert!(
        out.stdout.is_empty(),
        "c-chat printed a reply without weights: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A C program whose `on_text` calls back into its own session: chat, reset and free must
/// each fail with -1 and a message (they would alias the running call's session), and the
/// session must still work afterwards.
const REENTRANT_C: &str = r#"#include <stdio.h>
#include "kiln.h"
#include "kiln_model.h"

struct state {
    kiln_session *session;
    int calls, chat_rc, reset_rc, free_rc;
    char chat_err[512], reset_err[512], free_err[512];
};

static void on_text(const char *piece, void *user) {
    struct state *st = user;
    (void)piece;
    if (st->calls++ > 0) {
        return;
    }
    st->chat_rc = kiln_session_chat(st->session, "Again?", 4, 0.0f, 0, NULL, NULL);
    snprintf(st->chat_err, sizeof st->chat_err, "%s", kiln_last_error());
    st->reset_rc = kiln_session_reset(st->session);
    snprintf(st->reset_err, sizeof st->reset_err, "%s", kiln_last_error());
    st->free_rc = kiln_session_free(st->session);
    snprintf(st->free_err, sizeof st->free_err, "%s", kiln_last_error());
}

int main(int argc, char **argv) {
    if (argc != 2) {
        return 2;
    }
    kiln_session *session = kiln_session_new(&kiln_model, argv[1], 1);
    if (session == NULL) {
        fprintf(stderr, "kiln_session_new: %s\n", kiln_last_error());
        return 1;
    }
    struct state st = { session, 0, 1, 1, 1, "", "", "" };
    int outer = kiln_session_chat(session, "What is the capital of France?", 8, 0.0f, 0, on_text, &st);
    printf("outer %d\ncalls %d\n", outer, st.calls);
    printf("chat %d %s\nreset %d %s\nfree %d %s\n", st.chat_rc, st.chat_err, st.reset_rc, st.reset_err,
           st.free_rc, st.free_err);
    printf("after %d\n", kiln_session_chat(session, "And of Italy?", 4, 0.0f, 0, NULL, NULL));
    printf("reset_after %d\n", kiln_session_reset(session));
    printf("final_free %d\n", kiln_session_free(session));
    return 0;
}
"#;

/// Compiles the C program `source` against `kiln.h`, the app bundle's model library and
/// header, `extra` objects or archives, and the runtime's static library (built by [`app`]),
/// runs it with the bundle and `args` and returns its standard output.
fn compile_and_run_c(name: &str, source: &str, extra: &[PathBuf], args: &[&Path]) -> String {
    let (bundle, _) = app();
    let dir = scratch_dir(&format!("c-{name}"));
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let exe = dir.join(name);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new("cc")
        .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(root.join("runtime/include"))
        .arg("-I")
        .arg(bundle.join("include"))
        .arg(&src)
        .arg(bundle.join("lib/libkiln_model.a"))
        .args(extra)
        .arg(root.join("target/kiln-tests/apps/release/libruntime.a"))
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .status()
        .expect("run cc");
    assert!(status.success(), "compiling {} failed", src.display());
    let out = Command::new(&exe).arg(bundle).args(args).output().unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    eprintln!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name} failed: {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text after `key ` on the line of `stdout` that starts so.
fn value<'a>(stdout: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key} ");
    stdout.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {key:?} line in {stdout:?}"))
}

#[test]
fn callbacks_that_call_back_into_their_session_are_refused() {
    let stdout = compile_and_run_c("reentrant", REENTRANT_C, &[], &[]);
    let line = |key: &str| -> String { value(&stdout, key).to_string() };
    let number = |key: &str| -> i64 { line(key).split(' ').next().unwrap().parse().unwrap() };
    assert!(number("outer") > 0, "the outer call generated nothing: {stdout}");
    assert!(number("calls") >= 1, "on_text was never called: {stdout}");
    for key in ["chat", "reset", "free"] {
        let l = line(key);
        assert!(l.starts_with("-1 "), "{key} from inside on_text was not refused: {l:?}");
        assert!(l.contains("busy") && l.contains("on_text"), "{key}: unclear message {l:?}");
    }
    assert!(number("after") > 0, "the session does not work after the refused calls: {stdout}");
    assert_eq!(number("reset_after"), 0);
    assert_eq!(number("final_free"), 0);
}

/// Two model libraries linked into one C program (the app's bundle, and a second build of the
/// model with other options, whose `kiln_model` is renamed `kiln_model_draft` with objcopy:
/// a library exports no other symbol) and opened in one pool run on the pool's threads and
/// no others, and both answer; the pool may be freed before its sessions. Bad arguments fail
/// with a message instead of crashing: a NULL pool, model or bundle, a thread count out of
/// range, and a pool that was freed already.
const POOL_C: &str = r#"#include <stdio.h>
#include <dirent.h>
#include "kiln.h"
#include "kiln_model.h"

/* The second model library (its kiln_model renamed). */
extern const struct kiln_model_desc kiln_model_draft;

static void on_text(const char *piece, void *user) {
    (void)user;
    fputs(piece, stdout);
}

/* Threads of this process. */
static int threads(void) {
    int n = 0;
    DIR *dir = opendir("/proc/self/task");
    if (dir == NULL) {
        return -1;
    }
    for (struct dirent *e = readdir(dir); e != NULL; e = readdir(dir)) {
        n += e->d_name[0] != '.';
    }
    closedir(dir);
    return n;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        return 2;
    }
    printf("threads_before %d\n", threads());
    kiln_pool *pool = kiln_pool_new(3);
    if (pool == NULL) {
        fprintf(stderr, "kiln_pool_new: %s\n", kiln_last_error());
        return 1;
    }
    kiln_session *draft = kiln_session_new_in(pool, &kiln_model_draft, argv[2]);
    kiln_session *target = kiln_session_new_in(pool, &kiln_model, argv[1]);
    if (draft == NULL || target == NULL) {
        fprintf(stderr, "kiln_session_new_in: %s\n", kiln_last_error());
        return 1;
    }
    printf("threads_open %d\n", threads());
    /* Each call before its kiln_last_error(): printf's arguments have no order. */
    int failed = kiln_session_new_in(NULL, &kiln_model, argv[1]) == NULL;
    printf("null_pool %d %s\n", failed, kiln_last_error());
    failed = kiln_session_new_in(pool, NULL, argv[1]) == NULL;
    printf("null_model %d %s\n", failed, kiln_last_error());
    failed = kiln_session_new_in(pool, &kiln_model, NULL) == NULL;
    printf("null_bundle %d %s\n", failed, kiln_last_error());
    failed = kiln_session_new_in(pool, &kiln_model, "/nonexistent") == NULL;
    printf("no_bundle %d %s\n", failed, kiln_last_error());
    failed = kiln_session_new_in(pool, &kiln_model_draft, argv[1]) == NULL;
    printf("other_bundle %d %s\n", failed, kiln_last_error());
    failed = kiln_pool_new(100000) == NULL;
    printf("big_pool %d %s\n", failed, kiln_last_error());
    printf("free_null %d\n", kiln_pool_free(NULL));
    printf("free_pool %d\n", kiln_pool_free(pool));
    failed = kiln_session_new_in(pool, &kiln_model, argv[1]) == NULL;
    printf("freed_pool %d %s\n", failed, kiln_last_error());
    int rc = kiln_pool_free(pool);
    printf("free_again %d %s\n", rc, kiln_last_error());
    printf("draft:");
    int n_draft = kiln_session_chat(draft, "What is the capital of France?", 16, 0.0f, 0, on_text, NULL);
    printf("\ntarget:");
    int n_target = kiln_session_chat(target, "What is the capital of France?", 16, 0.0f, 0, on_text, NULL);
    printf("\ntokens %d %d\n", n_draft, n_target);
    printf("threads_chat %d\n", threads());
    printf("free_sessions %d %d\n", kiln_session_free(draft), kiln_session_free(target));
    return 0;
}
"#;

#[test]
fn two_models_in_one_pool_share_its_threads_and_both_answer() {
    let scratch = scratch_dir("c-pool-draft");
    let draft = scratch.join("bundle");
    let opts = BuildOptions {
        context: Some(256),
        batch: 32,
        ..BuildOptions::new(model_path(), "x86_64-unknown-linux-gnu", draft.clone())
    };
    build_model(&opts, &mut |_| {}).unwrap_or_else(|e| panic!("build failed: {e}"));
    let renamed = scratch.join("libkiln_model_draft.a");
    let status = Command::new("objcopy")
        .args(["--redefine-sym", "kiln_model=kiln_model_draft"])
        .arg(draft.join("lib/libkiln_model.a"))
        .arg(&renamed)
        .status()
        .expect("run objcopy");
    assert!(status.success(), "objcopy failed");
    let stdout = compile_and_run_c("pool", POOL_C, &[renamed], &[&draft]);
    let number = |key: &str| -> i64 { value(&stdout, key).split(' ').next().unwrap().parse().unwrap() };
    // A pool of 3: the calling thread and 2 workers, whatever number of sessions runs on it.
    assert_eq!(number("threads_open") - number("threads_before"), 2, "{stdout}");
    assert_eq!(number("threads_chat"), number("threads_open"), "{stdout}");
    for (key, message) in [
        ("null_pool", "pool is NULL"),
        ("null_model", "model is NULL"),
        ("null_bundle", "bundle_dir is NULL"),
        ("no_bundle", "/nonexistent"),
        ("other_bundle", "does not belong to this bundle"),
        ("big_pool", "thread count 100000 must be in 1..=256"),
        ("freed_pool", "not a live pool"),
        ("free_again", "not a live pool"),
    ] {
        let line = value(&stdout, key);
        let expected = if key == "free_again" { "-1 " } else { "1 " };
        assert!(line.starts_with(expected) && line.contains(message), "{key}: {line:?}");
    }
    assert_eq!(value(&stdout, "free_null"), "0");
    assert_eq!(value(&stdout, "free_pool"), "0");
    // Both sessions answer after their pool was freed (they keep its threads alive).
    for key in ["draft:", "target:"] {
        let reply = stdout.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no {key} in {stdout}"));
        assert!(reply.contains("Paris"), "{key} {reply:?}");
    }
    let tokens: Vec<i64> = value(&stdout, "tokens").split(' ').map(|n| n.parse().unwrap()).collect();
    assert!(tokens.iter().all(|&n| n > 0), "{stdout}");
    assert_eq!(value(&stdout, "free_sessions"), "0 0");
}

/// The C ABI's offloading: `kiln_session_set_offload` sends a multi-hop question to a kiln
/// server and keeps a simple one on the device, `kiln_session_last_origin` says which and why;
/// with the server gone the C program still gets one answer, from the device.
#[test]
fn c_program_offloads_through_the_c_abi() {
    let (bundle, exe) = app();
    // The server wants a key; the C program finds it in KILN_OFFLOAD_API_KEY.
    let served = crate::serve::served(&["--api-key", "sk-c-chat-1"]);
    let ask_with_key = |url: &str, prompt: &str, key: &str| {
        let out = Command::new(exe)
            .arg(bundle)
            .arg(prompt)
            .env("KILN_OFFLOAD_URL", url)
            .env("KILN_OFFLOAD_POLICY", "complexity:0.5")
            .env("KILN_OFFLOAD_API_KEY", key)
            .output()
            .unwrap();
        assert!(out.status.success(), "c-chat failed: {}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let ask = |url: &str, prompt: &str| ask_with_key(url, prompt, "sk-c-chat-1");
    let (reply, why) = ask(&served.url(), "What is the capital of the country where the Eiffel Tower stands?");
    assert!(why.contains("[server: complexity") && reply.contains("Paris"), "{why} {reply}");
    let (reply, why) =
        ask_with_key(&served.url(), "What is the capital of the country where the Eiffel Tower stands?", "sk-wrong");
    assert!(why.contains("[fallback:") && why.contains("401") && !reply.trim().is_empty(), "{why}");
    let (reply, why) = ask(&served.url(), PROMPT);
    assert!(why.contains("[device: complexity") && reply.contains("Paris"), "{why} {reply}");
    drop(served);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (reply, why) =
        ask(&format!("http://127.0.0.1:{port}"), "What is the capital of the country where the Eiffel Tower stands?");
    assert!(why.contains("[fallback:") && why.contains("answered on the device") && !reply.trim().is_empty(), "{why}");
}
