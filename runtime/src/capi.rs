//! The C ABI of the runtime, declared in `runtime/include/kiln.h`.
//!
//! Every function checks its pointers, never unwinds into C (panics are caught and reported
//! as errors), and reports failures by return value with a message from
//! [`kiln_last_error`].

use std::cell::{RefCell, UnsafeCell};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::program::ModelDesc;
use crate::sampling::SamplerConfig;
use crate::session::Session;

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

/// The message of the last failed call on this thread (never NULL).
#[no_mangle]
pub extern "C" fn kiln_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The session behind a C `kiln_session *`.
///
/// C may call back into a session from inside its own `on_text` callback, or from two threads
/// at once; either would alias the `&mut Session` of the running call. So the session sits in
/// an `UnsafeCell`, only shared references to `KilnSession` are ever made from the C pointer,
/// and `busy` hands out the one mutable borrow: a call that finds it taken fails instead.
pub struct KilnSession {
    busy: AtomicBool,
    session: UnsafeCell<Session>,
}

/// The exclusive use of a session, released on drop (also when the call panics).
struct Busy<'a>(&'a KilnSession);

impl Busy<'_> {
    fn session(&mut self) -> &mut Session {
        // SAFETY: holding `Busy` means `busy` was false and this call set it, so no other
        // reference to the inner session exists until it is dropped; `&mut self` keeps the
        // borrow unique within this call.
        unsafe { &mut *self.0.session.get() }
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
/// `session` must be NULL or a live pointer from `kiln_session_new`.
unsafe fn acquire<'a>(session: *mut KilnSession) -> Result<Busy<'a>, String> {
    // SAFETY: the caller passes a live session or NULL; only shared references are made.
    let s = unsafe { session.cast_const().as_ref() }.ok_or("session is NULL")?;
    if s.busy.swap(true, Ordering::Acquire) {
        return Err(BUSY.into());
    }
    Ok(Busy(s))
}

/// Opens a chat session on a linked model library and its bundle directory.
/// Returns NULL on failure (see `kiln_last_error`).
///
/// # Safety
/// `model` must point to a library's `kiln_model` descriptor; `bundle_dir` must be a valid C
/// string.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_new(
    model: *const ModelDesc,
    bundle_dir: *const c_char,
    n_threads: c_int,
) -> *mut KilnSession {
    let mut out = std::ptr::null_mut();
    guard(|| {
        if model.is_null() {
            return Err("model is NULL".into());
        }
        // SAFETY: the caller passes a valid C string or NULL.
        let dir = unsafe { str_arg(bundle_dir, "bundle_dir") }?;
        let threads = if n_threads <= 0 { 2 } else { n_threads as usize };
        // SAFETY: the caller passes the address of a linked library's descriptor, which lives
        // as long as the program; the session checks its ABI, layout and fingerprint.
        let desc: &'static ModelDesc = unsafe { &*model };
        let session = Session::open(desc, Path::new(dir), threads).map_err(|e| e.to_string())?;
        out = Box::into_raw(Box::new(KilnSession { busy: AtomicBool::new(false), session: UnsafeCell::new(session) }));
        Ok(())
    });
    out
}

/// Frees a session (NULL is ignored). Returns 0, or -1 when the session is in use (from
/// inside its own callback): then it is not freed.
///
/// # Safety
/// `session` must be NULL or come from `kiln_session_new`, and not be used afterwards.
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

/// Forgets the conversation. Returns 0, or -1 (NULL or busy session, see `kiln_last_error`).
///
/// # Safety
/// `session` must be NULL or come from `kiln_session_new`.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_reset(session: *mut KilnSession) -> c_int {
    guard(|| {
        // SAFETY: the caller passes a live session or NULL.
        let mut busy = unsafe { acquire(session) }?;
        busy.session().reset();
        Ok(())
    })
}

/// Called with each piece of generated text (NUL-terminated, UTF-8).
pub type TextCallback = Option<unsafe extern "C" fn(piece: *const c_char, user: *mut c_void)>;

/// One chat turn: appends `user_message` to the conversation and streams the reply to
/// `on_text`. `temperature` 0 is greedy decoding. Returns the number of generated tokens, or
/// -1 on failure (see `kiln_last_error`), also when called on a session that is already
/// running a call (from its own `on_text`).
///
/// # Safety
/// `session` must be NULL or come from `kiln_session_new`; `user_message` must be a valid C
/// string; `on_text` may be NULL.
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
        let (_, stats) = busy
            .session()
            .chat(msg, max_tokens as usize, &cfg, |piece| {
                if let (Some(cb), Ok(c)) = (on_text, CString::new(piece)) {
                    // SAFETY: the caller's callback takes a C string and its user pointer. If
                    // it calls back into this session, that call finds `busy` set and fails.
                    unsafe { cb(c.as_ptr(), user) };
                }
            })
            .map_err(|e| e.to_string())?;
        n = stats.generated_tokens as c_int;
        Ok(())
    });
    if rc == 0 {
        n
    } else {
        -1
    }
}
