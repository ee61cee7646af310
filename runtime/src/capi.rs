//! The C ABI of the runtime. `runtime/include/kiln.h` is generated from this file by cbindgen
//! (`cargo xtask header`): the `///` comments here are the header's documentation, written
//! for C programmers; notes for Rust readers are `//` comments.
//!
//! Every function checks its pointers, never unwinds into C (panics are caught and reported
//! as errors), and reports failures by return value with a message from
//! [`kiln_last_error`].

use std::cell::{RefCell, UnsafeCell};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use std::sync::{Arc, Mutex, MutexGuard};

use crate::pool::Workers;
use crate::program::{workers, ModelDesc};
use crate::sampling::SamplerConfig;
use crate::session::{Model, Session};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: impl Into<String>) {
    let msg = msg.into().replace('\0', " ");
    LAST_ERROR.with(|e| *e.borrow_mut() = CString::new(msg).unwrap_or_default());
}

/// Runs `f`, turning errors and panics into a return code of -1 with a message.
fn guard(f: impl FnOnce() -> Result<(), String>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => 0,
        Ok(Err(msg)) => {
            set_error(msg);
            -1
        }
        Err(_) => {
            set_error("internal error (panic) in the kiln runtime");
            -1
        }
    }
}

/// # Safety
/// `s` must be null or a valid NUL-terminated string.
unsafe fn str_arg<'a>(s: *const c_char, what: &str) -> Result<&'a str, String> {
    if s.is_null() {
        return Err(format!("{what} is NULL"));
    }
    // SAFETY: the caller passes a valid C string.
    unsafe { CStr::from_ptr(s) }.to_str().map_err(|_| format!("{what} is not valid UTF-8"))
}

/// The message of the last failed call on this thread (never NULL), valid until the next call
/// that fails on this thread.
#[no_mangle]
pub extern "C" fn kiln_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Threads and callbacks:
/// - A session serves one call at a time: use it from one thread at a time. Different
///   sessions may be used on different threads at once.
/// - on_text runs on the calling thread, inside kiln_session_chat, while the session is in
///   use. It must not call into the same session: kiln_session_chat, kiln_session_reset and
///   kiln_session_free on it fail with -1 (see kiln_last_error) and change nothing. The same
///   happens to a call that overlaps a running call from another thread; still, do not
///   share a session between threads without your own lock, and never free a session that
///   another thread may be using (that call could start after the memory is gone).
/// - kiln_last_error() is per thread.
//
// The session behind a C `kiln_session *`. C may call back into a session from inside its
// own `on_text` callback, or from two threads at once; either would alias the `&mut Session`
// of the running call. So the session sits in an `UnsafeCell`, only shared references to
// `KilnSession` are ever made from the C pointer, and `busy` hands out the one mutable
// borrow: a call that finds it taken fails instead.
pub struct KilnSession {
    busy: AtomicBool,
    inner: UnsafeCell<Inner>,
}

/// What a C session holds besides the flag.
struct Inner {
    session: Session,
    /// Set by `kiln_session_set_offload`.
    #[cfg(feature = "offload")]
    offload: Option<crate::offload::Offloader>,
    /// Where the last answer came from (0 device, 1 server, 2 fallback) and why.
    last: Option<(c_int, CString)>,
}

/// The exclusive use of a session, released on drop (also when the call panics).
struct Busy<'a>(&'a KilnSession);

impl Busy<'_> {
    fn inner(&mut self) -> &mut Inner {
        // SAFETY: holding `Busy` means `busy` was false and this call set it, so no other
        // reference to the inner session exists until it is dropped; `&mut self` keeps the
        // borrow unique within this call.
        unsafe { &mut *self.0.inner.get() }
    }

    fn session(&mut self) -> &mut Session {
        &mut self.inner().session
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

const BUSY: &str = "the session is busy: it was called from inside its own on_text callback, or from two \
                    threads at once (a session serves one call at a time)";

/// # Safety
/// `session` must be NULL or a live pointer from `kiln_session_new` or `kiln_session_new_in`.
unsafe fn acquire<'a>(session: *mut KilnSession) -> Result<Busy<'a>, String> {
    // SAFETY: the caller passes a live session or NULL; only shared references are made.
    let s = unsafe { session.cast_const().as_ref() }.ok_or("session is NULL")?;
    if s.busy.swap(true, Ordering::Acquire) {
        return Err(BUSY.into());
    }
    Ok(Busy(s))
}

/// A thread pool that sessions of several models run on (kiln_session_new_in): an app with
/// two models (a draft and a target, a device model and a router) runs both on one set of
/// threads, one model call at a time, instead of two sets of threads competing for the cores.
/// Reference-counted: every session opened in a pool keeps it alive, so kiln_pool_free may
/// come before or after kiln_session_free of its sessions; the threads end with the last one.
pub struct KilnPool {
    workers: Arc<Workers>,
}

// The addresses of the pools not yet freed. A pool pointer is dereferenced only while it is
// found here, under the lock, so a freed (or never made) pool given to kiln_pool_free or
// kiln_session_new_in is an error instead of a use after free.
static LIVE_POOLS: Mutex<Vec<usize>> = Mutex::new(Vec::new());

fn live_pools() -> MutexGuard<'static, Vec<usize>> {
    LIVE_POOLS.lock().unwrap_or_else(|e| e.into_inner())
}

const NOT_A_POOL: &str = "pool is not a live pool from kiln_pool_new (freed already?)";

/// The thread count of kiln_session_new and kiln_pool_new: 2 for zero or less.
fn thread_count(n_threads: c_int) -> usize {
    if n_threads <= 0 {
        2
    } else {
        n_threads as usize
    }
}

/// # Safety
/// `model` must be NULL or point to a library's `kiln_model` descriptor.
unsafe fn model_arg(model: *const abi::kiln_model_desc) -> Result<&'static ModelDesc, String> {
    // SAFETY: the caller passes the address of a linked library's descriptor, which lives as
    // long as the program (or NULL); `ModelDesc` is a `repr(transparent)` wrapper of
    // `kiln_model_desc`. The session checks its ABI, layout and fingerprint.
    unsafe { model.cast::<ModelDesc>().as_ref() }.ok_or_else(|| "model is NULL".into())
}

/// A C session, boxed, around a fresh session on `model`.
fn new_session(model: &Model) -> Result<*mut KilnSession, String> {
    let session = Session::new(model).map_err(|e| e.to_string())?;
    let inner = Inner {
        session,
        #[cfg(feature = "offload")]
        offload: None,
        last: None,
    };
    Ok(Box::into_raw(Box::new(KilnSession { busy: AtomicBool::new(false), inner: UnsafeCell::new(inner) })))
}

/// Opens a chat session on a linked model (&kiln_model) and its bundle directory (for
/// manifest.json, tokenizer.json and weights.bin). The library must come from the same
/// build as the bundle (their fingerprints are compared). n_threads <= 0 picks 2.
/// NULL on failure.
///
/// # Safety
/// model must point to a library's kiln_model descriptor; bundle_dir must be a valid C
/// string.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_new(
    model: *const abi::kiln_model_desc,
    bundle_dir: *const c_char,
    n_threads: c_int,
) -> *mut KilnSession {
    let mut out = std::ptr::null_mut();
    guard(|| {
        // SAFETY: the caller passes a library's descriptor or NULL.
        let desc = unsafe { model_arg(model) }?;
        // SAFETY: the caller passes a valid C string or NULL.
        let dir = unsafe { str_arg(bundle_dir, "bundle_dir") }?;
        let model = Model::open(desc, Path::new(dir), thread_count(n_threads)).map_err(|e| e.to_string())?;
        out = new_session(&model)?;
        Ok(())
    });
    out
}

/// A thread pool of n_threads threads (the calling thread of each model call included;
/// n_threads <= 0 picks 2, at most 256) for kiln_session_new_in. NULL on failure.
#[no_mangle]
pub extern "C" fn kiln_pool_new(n_threads: c_int) -> *mut KilnPool {
    let mut out = std::ptr::null_mut();
    guard(|| {
        let workers = workers(thread_count(n_threads)).map_err(|e| e.to_string())?;
        let mut live = live_pools();
        out = Box::into_raw(Box::new(KilnPool { workers }));
        live.push(out as usize);
        Ok(())
    });
    out
}

/// Lets go of a pool (NULL is ignored): its threads end when no session opened in it is
/// left, and sessions opened in it stay usable. Returns 0, or -1 for a pointer that is not
/// a live pool (freed already).
#[no_mangle]
// Safe to call with any pointer: it is dereferenced only when found in the registry of live
// pools, so this is not an `unsafe fn` (clippy cannot see the registry check).
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub extern "C" fn kiln_pool_free(pool: *mut KilnPool) -> c_int {
    if pool.is_null() {
        return 0;
    }
    guard(|| {
        let mut live = live_pools();
        let at = live.iter().position(|&p| p == pool as usize).ok_or(NOT_A_POOL)?;
        live.swap_remove(at);
        // SAFETY: the pointer was live (registered by kiln_pool_new, not yet removed), so it
        // came from Box::into_raw there and is freed once: it left the registry under the
        // lock. Sessions hold their own reference to the threads.
        drop(unsafe { Box::from_raw(pool) });
        Ok(())
    })
}

/// kiln_session_new on the threads of pool: sessions of different models opened in one pool
/// share its threads. NULL on failure (also for a NULL or freed pool).
///
/// # Safety
/// model and bundle_dir as for kiln_session_new.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_new_in(
    pool: *mut KilnPool,
    model: *const abi::kiln_model_desc,
    bundle_dir: *const c_char,
) -> *mut KilnSession {
    let mut out = std::ptr::null_mut();
    guard(|| {
        if pool.is_null() {
            return Err("pool is NULL".into());
        }
        let workers = {
            let live = live_pools();
            if !live.contains(&(pool as usize)) {
                return Err(NOT_A_POOL.into());
            }
            // SAFETY: the pool is live (registered and not freed), and kiln_pool_free cannot
            // free it while this thread holds the registry's lock; only a shared reference is
            // made, to clone the threads' `Arc`.
            Arc::clone(&unsafe { &*pool }.workers)
        };
        // SAFETY: the caller passes a library's descriptor or NULL.
        let desc = unsafe { model_arg(model) }?;
        // SAFETY: the caller passes a valid C string or NULL.
        let dir = unsafe { str_arg(bundle_dir, "bundle_dir") }?;
        let model = Model::open_in(&workers, desc, Path::new(dir)).map_err(|e| e.to_string())?;
        out = new_session(&model)?;
        Ok(())
    });
    out
}

/// Frees a session; NULL is ignored. Returns 0, or -1 (and frees nothing) when the session
/// is in use, e.g. when called from its own on_text.
///
/// # Safety
/// session must be NULL or come from kiln_session_new or kiln_session_new_in, and not be used
/// afterwards.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_free(session: *mut KilnSession) -> c_int {
    if session.is_null() {
        return 0;
    }
    guard(|| {
        // SAFETY: the caller passes a live session.
        let busy = unsafe { acquire(session) }?;
        std::mem::forget(busy);
        // SAFETY: the pointer came from Box::into_raw in kiln_session_new, and no call is
        // using it (we just took `busy`, which no one will release).
        drop(unsafe { Box::from_raw(session) });
        Ok(())
    })
}

/// Forgets the conversation. Returns 0, or -1 for a NULL or busy session.
///
/// # Safety
/// session must be NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_reset(session: *mut KilnSession) -> c_int {
    guard(|| {
        // SAFETY: the caller passes a live session or NULL.
        let mut busy = unsafe { acquire(session) }?;
        busy.session().reset();
        Ok(())
    })
}

/// Called with each piece of generated text (NUL-terminated UTF-8).
pub type TextCallback = Option<unsafe extern "C" fn(piece: *const c_char, user: *mut c_void)>;

/// One chat turn: appends user_message, streams the reply to on_text (may be NULL).
/// temperature 0 decodes greedily. Returns the number of generated tokens, or -1 (also
/// when the session is busy, e.g. called from its own on_text).
///
/// # Safety
/// session must be NULL or a live session; user_message must be a valid C string.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_chat(
    session: *mut KilnSession,
    user_message: *const c_char,
    max_tokens: c_int,
    temperature: f32,
    seed: u64,
    on_text: TextCallback,
    user: *mut c_void,
) -> c_int {
    let mut n = 0;
    let rc = guard(|| {
        // SAFETY: the caller passes a live session or NULL.
        let mut busy = unsafe { acquire(session) }?;
        // SAFETY: the caller passes a valid C string or NULL.
        let msg = unsafe { str_arg(user_message, "user_message") }?;
        if max_tokens < 0 {
            return Err(format!("max_tokens {max_tokens} is negative"));
        }
        let cfg = SamplerConfig { temperature, seed, ..SamplerConfig::default() };
        let emit = |piece: &str| {
            if let (Some(cb), Ok(c)) = (on_text, CString::new(piece)) {
                // SAFETY: the caller's callback takes a C string and its user pointer. If
                // it calls back into this session, that call finds `busy` set and fails.
                unsafe { cb(c.as_ptr(), user) };
            }
        };
        let inner = busy.inner();
        #[cfg(feature = "offload")]
        if let Some(o) = &inner.offload {
            let r = o.chat(&mut inner.session, msg, max_tokens as usize, &cfg, emit).map_err(|e| e.to_string())?;
            let origin = match r.origin {
                crate::offload::Origin::Device => 0,
                crate::offload::Origin::Server => 1,
                crate::offload::Origin::Fallback => 2,
            };
            inner.last = Some((origin, CString::new(r.reason.replace('\0', " ")).unwrap_or_default()));
            n = r.device_tokens as c_int;
            return Ok(());
        }
        let (_, stats) = inner.session.chat(msg, max_tokens as usize, &cfg, emit).map_err(|e| e.to_string())?;
        inner.last = Some((0, CString::new("on the device (no offloading configured)").unwrap_or_default()));
        n = stats.generated_tokens as c_int;
        Ok(())
    });
    if rc == 0 {
        n
    } else {
        -1
    }
}

/// Offloading: after this, kiln_session_chat answers each turn on the device or by the
/// OpenAI-compatible server at url (http://host:port), as policy decides: "never", "always",
/// "complexity[:T]", "confidence[:K[:LOGP]]", or several joined by "+". api_key_env names the
/// environment variable holding the API key (NULL: none); timeout_ms (> 0) bounds each server
/// request; retries (>= 0) further attempts follow a failure that left no text with on_text.
/// A server failure never loses or repeats text: the device answers, or finishes the answer.
/// With offloading, kiln_session_chat returns the tokens generated on the device (0 for a
/// server answer). url NULL turns offloading off. Returns 0 or -1 (also when the runtime was
/// built without its offload feature).
///
/// # Safety
/// session must be NULL or a live session; the strings must be NULL or valid C strings.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_set_offload(
    session: *mut KilnSession,
    url: *const c_char,
    policy: *const c_char,
    api_key_env: *const c_char,
    timeout_ms: c_int,
    retries: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: the caller passes a live session or NULL.
        let mut busy = unsafe { acquire(session) }?;
        #[cfg(feature = "offload")]
        {
            if url.is_null() {
                busy.inner().offload = None;
                return Ok(());
            }
            // SAFETY: the caller passes valid C strings or NULL.
            let (url, policy) = unsafe { (str_arg(url, "url")?, str_arg(policy, "policy")?) };
            let key_env = if api_key_env.is_null() {
                None
            } else {
                // SAFETY: as above.
                Some(unsafe { str_arg(api_key_env, "api_key_env") }?.to_string())
            };
            if timeout_ms <= 0 || retries < 0 {
                return Err(format!("timeout_ms ({timeout_ms}) must be positive and retries ({retries}) not negative"));
            }
            let config = crate::offload::OffloadConfig {
                api_key_env: key_env,
                timeout: std::time::Duration::from_millis(timeout_ms as u64),
                retries: retries as u32,
                ..crate::offload::OffloadConfig::new(url, policy.parse()?)
            };
            busy.inner().offload = Some(crate::offload::Offloader::new(config)?);
            Ok(())
        }
        #[cfg(not(feature = "offload"))]
        {
            let _ = (&mut busy, url, policy, api_key_env, timeout_ms, retries);
            Err("this runtime was built without the `offload` feature".into())
        }
    })
}

/// Where the last answer came from: 0 device, 1 server, 2 device after a server failure;
/// -1 before any answer. The reason (figures and error kinds, never the prompt) is copied
/// into reason (NUL-terminated, at most reason_len bytes) when it is not NULL.
///
/// # Safety
/// session must be NULL or a live session; reason must be NULL or point to reason_len
/// writable bytes.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_last_origin(
    session: *mut KilnSession,
    reason: *mut c_char,
    reason_len: usize,
) -> c_int {
    let mut origin = -1;
    let rc = guard(|| {
        // SAFETY: the caller passes a live session or NULL.
        let mut busy = unsafe { acquire(session) }?;
        let Some((o, why)) = &busy.inner().last else { return Err("no answer yet".into()) };
        origin = *o;
        if !reason.is_null() && reason_len > 0 {
            let bytes = why.as_bytes();
            let n = bytes.len().min(reason_len - 1);
            // SAFETY: the caller's buffer holds reason_len bytes; n + 1 <= reason_len.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), reason, n);
                *reason.add(n) = 0;
            }
        }
        Ok(())
    });
    if rc == 0 {
        origin
    } else {
        -1
    }
}
