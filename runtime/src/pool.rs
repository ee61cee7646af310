//! A small fork-join thread pool for compiled kernels, in the style of ggml's threadpool.
//!
//! [`ThreadPool::new(n)`](ThreadPool::new) spawns `n - 1` workers; the thread that calls
//! [`ThreadPool::run`] takes part as thread 0. A run publishes the task and bumps an atomic
//! *generation* counter; workers spin on that counter (with `spin_loop` hints) for about [`SPIN_TIME`] after their last task before they park on a condition
//! variable, so the ~400 dispatches of one generated token are picked up within a fraction of
//! a microsecond each while an idle pool costs no CPU. (`yield_now` is used only when the
//! pool has more threads than CPUs, and by the caller after a few thousand spins, so that a
//! preempted thread can get back on a CPU.) Completion is an atomic countdown that the
//! calling thread spins on.
//!
//! Compiled code reaches the pool through [`kiln_parallel_for`], a C-ABI function taking the
//! pool as an opaque pointer ([`ThreadPool::as_ptr`]), a [`TaskFn`] and its context.
//!
//! Panics: a task that panics on a worker is caught there; the run still waits for every
//! thread and then panics on the calling thread. A panic of the caller's own share is re-raised
//! after the workers are done too. Through [`kiln_parallel_for`] (which must not unwind into
//! compiled code) any task panic aborts the process with a message.
//!
//! A `run` issued from inside a task (nested parallelism) executes its `nth` shares one after
//! the other on the current thread instead of deadlocking. Concurrent `run`s on one pool from
//! different threads are serialised.

use std::cell::Cell;
use std::ffi::c_void;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long an idle worker spins for new work before parking.
pub const SPIN_TIME: Duration = Duration::from_micros(100);

/// Spin iterations between two clock reads (or `yield_now` calls) while waiting.
const SPINS_PER_CHECK: u32 = 64;

/// Spin iterations the caller of `run` waits for the workers before it starts yielding.
const CALLER_PURE_SPINS: u32 = 4096;

use abi::kiln_ctx;
/// Type of a compiled kernel task: task(ctx, ith, nth) (the ABI's `kiln_task_fn`).
pub use abi::kiln_task_fn as TaskFn;

type Task<'a> = &'a (dyn Fn(usize, usize) + Sync);

thread_local! {
    /// Set while this thread executes a task share (on a worker or in `run`).
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

struct Shared {
    n_threads: usize,
    /// More threads than CPUs: waiting threads yield their CPU now and then while spinning.
    oversubscribed: bool,
    /// Bumped once per run (and once at shutdown). Workers compare it with the last one seen.
    generation: AtomicU64,
    /// Points to a `Task<'_>` on the stack of the thread inside `run`, valid until `pending`
    /// reaches 0.
    task: AtomicPtr<c_void>,
    /// Workers that have not finished the current run.
    pending: AtomicUsize,
    /// Some worker's task panicked during the current run.
    panicked: AtomicBool,
    shutdown: AtomicBool,
    /// Workers parked (or about to park) on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

fn lock(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    // The mutexes guard no data, so a poisoned one is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fork-join pool of `n_threads` threads (the caller of [`run`](Self::run) included).
/// A pool and the turn its users take: the threads every library of the process that asks
/// for the same number of threads runs on. Two libraries in one process (a model and its
/// reference, say) then take turns on one set of threads instead of two sets spinning against
/// each other on the same cores.
pub struct Workers {
    pub pool: ThreadPool,
    /// One library call at a time (a call keeps every thread of the pool busy).
    pub turn: Mutex<()>,
}

/// The machine's physical cores (hyperthread siblings counted once), the default of
/// `--threads` as in llama.cpp: a second thread on a core only competes for its vector units.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut cores = std::collections::BTreeSet::new();
    for cpu in 0..logical.max(1) * 4 {
        let dir = format!("/sys/devices/system/cpu/cpu{cpu}/topology");
        let (Ok(package), Ok(core)) = (
            std::fs::read_to_string(format!("{dir}/physical_package_id")),
            std::fs::read_to_string(format!("{dir}/core_id")),
        ) else {
            continue;
        };
        cores.insert((package.trim().to_string(), core.trim().to_string()));
    }
    if cores.is_empty() {
        logical
    } else {
        cores.len().min(logical)
    }
}

/// The process's pool of `n_threads` threads, made on first use and shared while any library
/// holds it (the last one to let go joins its threads).
pub fn shared_workers(n_threads: usize) -> Arc<Workers> {
    static POOLS: Mutex<Vec<(usize, std::sync::Weak<Workers>)>> = Mutex::new(Vec::new());
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    pools.retain(|(_, w)| w.strong_count() > 0);
    if let Some(w) = pools.iter().filter(|(n, _)| *n == n_threads).find_map(|(_, w)| w.upgrade()) {
        return w;
    }
    let w = Arc::new(Workers { pool: ThreadPool::new(n_threads), turn: Mutex::new(()) });
    pools.push((n_threads, Arc::downgrade(&w)));
    w
}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises concurrent `run` calls.
    run_lock: Mutex<()>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool").field("n_threads", &self.n_threads()).finish_non_exhaustive()
    }
}

impl ThreadPool {
    /// Creates a pool of `n_threads` threads: the calling thread of each `run` plus
    /// `n_threads - 1` spawned workers.
    ///
    /// # Panics
    /// If `n_threads == 0` or a thread cannot be spawned.
    pub fn new(n_threads: usize) -> Self {
        assert!(n_threads >= 1, "ThreadPool::new: n_threads must be >= 1");
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        let shared = Arc::new(Shared {
            n_threads,
            oversubscribed: n_threads > cpus,
            generation: AtomicU64::new(0),
            task: AtomicPtr::new(std::ptr::null_mut()),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..n_threads)
            .map(|ith| {
                let shared = Arc::clone(&shared);
                thread::Builder::new()
                    .name(format!("kiln-pool-{ith}"))
                    .spawn(move || worker_loop(&shared, ith))
                    .expect("ThreadPool::new: failed to spawn a worker thread")
            })
            .collect();
        ThreadPool { shared, workers, run_lock: Mutex::new(()) }
    }

    /// Number of threads taking part in each run (workers + the caller).
    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// This pool as the opaque pointer [`kiln_parallel_for`] expects. It is valid as long as
    /// the pool is neither moved nor dropped.
    pub fn as_ptr(&self) -> *mut c_void {
        self as *const ThreadPool as *mut c_void
    }

    /// Calls `f(ith, nth)` once for every `ith` in `0..nth` (`nth = n_threads()`), concurrently,
    /// and returns when all calls have returned. The calling thread runs `ith = 0`.
    ///
    /// # Panics
    /// If any call panicked (after all calls have finished).
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        let nth = self.shared.n_threads;
        if nth == 1 || IN_TASK.with(Cell::get) {
            // Single-threaded pool, or nested inside a task: run the shares in order here.
            for ith in 0..nth {
                f(ith, nth);
            }
            return;
        }

        let _serial = lock(&self.run_lock);
        let sh = &*self.shared;
        let task: Task<'_> = f;
        sh.pending.store(nth - 1, Ordering::Relaxed);
        sh.task.store(&task as *const Task<'_> as *mut c_void, Ordering::Relaxed);
        // Publishes `task` and `pending` (SeqCst also orders it before the `sleepers` load).
        sh.generation.fetch_add(1, Ordering::SeqCst);
        if sh.sleepers.load(Ordering::SeqCst) > 0 {
            // A worker that counted itself in `sleepers` holds `lock` until it waits, so
            // taking the lock here guarantees the notification reaches it.
            let _g = lock(&sh.lock);
            sh.wake.notify_all();
        }

        let own = run_share(f, 0, nth);

        // Wait for the workers. They must all be done before `task` (on this stack) dies,
        // even if our own share panicked.
        // Pure spinning first; then yield now and then, in case a worker was preempted.
        let mut spins = 0u32;
        while sh.pending.load(Ordering::Acquire) != 0 {
            spins = spins.saturating_add(1);
            if (sh.oversubscribed || spins > CALLER_PURE_SPINS) && spins.is_multiple_of(SPINS_PER_CHECK) {
                thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        sh.task.store(std::ptr::null_mut(), Ordering::Relaxed);

        if let Err(payload) = own {
            sh.panicked.store(false, Ordering::Relaxed);
            panic::resume_unwind(payload);
        }
        if sh.panicked.swap(false, Ordering::Relaxed) {
            panic!("kiln thread pool: a task panicked on a worker thread");
        }
    }
}

/// Runs one share with `IN_TASK` set, catching a panic.
fn run_share(f: Task<'_>, ith: usize, nth: usize) -> std::thread::Result<()> {
    IN_TASK.with(|c| c.set(true));
    let r = panic::catch_unwind(AssertUnwindSafe(|| f(ith, nth)));
    IN_TASK.with(|c| c.set(false));
    r
}

fn worker_loop(sh: &Shared, ith: usize) {
    let nth = sh.n_threads;
    let mut seen = 0u64;
    loop {
        seen = wait_for_generation(sh, seen);
        if sh.shutdown.load(Ordering::Acquire) {
            return;
        }
        let ptr = sh.task.load(Ordering::Relaxed) as *const Task<'_>;
        // SAFETY: the generation bump we observed (acquire) happened after `run` stored a
        // pointer to its `Task` local, and `run` keeps that local alive, unmodified, until
        // `pending` drops to 0, which happens only after our decrement below, our last
        // access to it. The closure is `Sync`, so calling it from this thread is allowed.
        let f: Task<'_> = unsafe { *ptr };
        if run_share(f, ith, nth).is_err() {
            sh.panicked.store(true, Ordering::Relaxed);
        }
        // Release: makes this share's writes (and `panicked`) visible to the waiting caller.
        sh.pending.fetch_sub(1, Ordering::Release);
    }
}

/// Waits until `generation != seen` and returns the new value: spins for [`SPIN_TIME`]
/// (yielding now and then if the pool has more threads than there are CPUs), then parks.
fn wait_for_generation(sh: &Shared, seen: u64) -> u64 {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let g = sh.generation.load(Ordering::Acquire);
        if g != seen {
            return g;
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(SPINS_PER_CHECK) {
            if start.elapsed() >= SPIN_TIME {
                break;
            }
            if sh.oversubscribed {
                thread::yield_now();
            }
        } else {
            std::hint::spin_loop();
        }
    }
    let mut guard = lock(&sh.lock);
    sh.sleepers.fetch_add(1, Ordering::SeqCst);
    let mut g = sh.generation.load(Ordering::SeqCst);
    while g == seen {
        guard = sh.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        g = sh.generation.load(Ordering::SeqCst);
    }
    sh.sleepers.fetch_sub(1, Ordering::SeqCst);
    drop(guard);
    g
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        let sh = &*self.shared;
        sh.shutdown.store(true, Ordering::Release);
        sh.generation.fetch_add(1, Ordering::SeqCst);
        {
            let _g = lock(&sh.lock);
            sh.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            // Worker bodies catch task panics, so a join error is not expected; ignore it
            // rather than panic inside drop.
            let _ = w.join();
        }
    }
}

/// Called by compiled code: runs task(ctx, ith, nth) for all ith on the pool and waits.
///
/// A null `pool` runs `task(ctx, 0, 1)` on the calling thread. If a task panics (it can only
/// if it calls back into Rust), the process is aborted with a message, since unwinding into
/// compiled code is not possible.
///
/// # Safety
/// `pool` must be null or come from [`ThreadPool::as_ptr`] of a live pool, and `task` must be
/// safe to call concurrently from several threads with this `ctx` and every `ith` in `0..nth`.
#[no_mangle]
pub unsafe extern "C" fn kiln_parallel_for(pool: *mut c_void, task: TaskFn, ctx: *const kiln_ctx) {
    /// The context pointer, shareable between the pool's threads.
    struct Ctx(*const kiln_ctx);
    // SAFETY: the caller of `kiln_parallel_for` guarantees that `task` may use `ctx` from
    // several threads at once; the pointer itself is only copied.
    unsafe impl Sync for Ctx {}
    let ctx = Ctx(ctx);

    if pool.is_null() {
        // SAFETY: the caller guarantees `task` may be called with `ctx`, `ith = 0`, `nth = 1`.
        unsafe { task(ctx.0, 0, 1) };
        return;
    }
    // SAFETY: the caller guarantees a non-null `pool` points to a live `ThreadPool`; we only
    // take a shared reference, and `run` is safe to call through one.
    let pool = unsafe { &*(pool as *const ThreadPool) };
    let body = |ith: usize, nth: usize| {
        let ctx = &ctx;
        // SAFETY: the caller guarantees `task` is safe to call concurrently with this `ctx`
        // for every `ith` in `0..nth`; `run` passes each `ith` exactly once.
        unsafe { task(ctx.0, ith as i64, nth as i64) };
    };
    if panic::catch_unwind(AssertUnwindSafe(|| pool.run(&body))).is_err() {
        eprintln!("kiln_parallel_for: a task panicked; aborting");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_asking_for_the_same_threads_share_one_pool() {
        let a = shared_workers(3);
        let b = shared_workers(3);
        assert!(Arc::ptr_eq(&a, &b));
        let c = shared_workers(2);
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!((a.pool.n_threads(), c.pool.n_threads()), (3, 2));
        let weak = Arc::downgrade(&a);
        drop((a, b));
        assert!(weak.upgrade().is_none(), "the last holder's drop joins the pool");
        let d = shared_workers(3);
        let sum = AtomicUsize::new(0);
        d.pool.run(&|ith, _| {
            sum.fetch_add(ith + 1, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 6);
    }
    use std::sync::atomic::AtomicU32;

    fn partition(len: usize, ith: usize, nth: usize) -> std::ops::Range<usize> {
        let chunk = len.div_ceil(nth);
        (ith * chunk).min(len)..((ith + 1) * chunk).min(len)
    }

    #[test]
    fn types_are_send_and_sync() {
        fn is_send_sync<T: Send + Sync>() {}
        is_send_sync::<ThreadPool>();
    }

    #[test]
    fn partitioned_sums_are_correct() {
        let data: Vec<u64> = (0..1_000_003u64).map(|i| i * 7 % 1000).collect();
        let expected: u64 = data.iter().sum();
        for n in 1..=4 {
            let pool = ThreadPool::new(n);
            assert_eq!(pool.n_threads(), n);
            let total = AtomicU64::new(0);
            let calls = AtomicUsize::new(0);
            let seen = Mutex::new(vec![0u32; n]);
            pool.run(&|ith, nth| {
                assert_eq!(nth, n);
                seen.lock().unwrap()[ith] += 1;
                calls.fetch_add(1, Ordering::Relaxed);
                let s: u64 = data[partition(data.len(), ith, nth)].iter().sum();
                total.fetch_add(s, Ordering::Relaxed);
            });
            assert_eq!(total.load(Ordering::Relaxed), expected, "n = {n}");
            assert_eq!(calls.load(Ordering::Relaxed), n);
            assert_eq!(*seen.lock().unwrap(), vec![1u32; n]);
        }
    }

    #[test]
    fn writes_by_workers_are_visible_after_run() {
        let pool = ThreadPool::new(3);
        let mut out = vec![0u32; 3000];
        for round in 1..=50u32 {
            let ptr = out.as_mut_ptr() as usize;
            let len = out.len();
            pool.run(&|ith, nth| {
                for i in partition(len, ith, nth) {
                    // SAFETY: shares write disjoint ranges of `out`, which outlives the run.
                    unsafe { *(ptr as *mut u32).add(i) = round * 10_000 + i as u32 };
                }
            });
            assert!(out.iter().enumerate().all(|(i, &v)| v == round * 10_000 + i as u32));
        }
    }

    #[test]
    fn many_tiny_runs_lose_no_wakeups() {
        for n in [2, 4] {
            let pool = ThreadPool::new(n);
            let counter = AtomicU64::new(0);
            let runs = 100_000u64;
            for _ in 0..runs {
                pool.run(&|ith, _| {
                    counter.fetch_add(ith as u64 + 1, Ordering::Relaxed);
                });
            }
            let per_run = (n * (n + 1) / 2) as u64;
            assert_eq!(counter.load(Ordering::Relaxed), runs * per_run);
        }
    }

    #[test]
    fn runs_after_workers_parked() {
        let pool = ThreadPool::new(3);
        let counter = AtomicU64::new(0);
        for _ in 0..20 {
            // Let the workers go past their spin time and park.
            thread::sleep(SPIN_TIME * 5);
            pool.run(&|_, _| {
                counter.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(counter.load(Ordering::Relaxed), 60);
    }

    static FFI_SUM: AtomicU64 = AtomicU64::new(0);

    unsafe extern "C" fn ffi_task(ctx: *const kiln_ctx, ith: i64, nth: i64) {
        // SAFETY: the tests pass a pointer to a live `Vec<u64>` that nobody mutates.
        let data = unsafe { &*(ctx as *const Vec<u64>) };
        let s: u64 = data[partition(data.len(), ith as usize, nth as usize)].iter().sum();
        FFI_SUM.fetch_add(s, Ordering::Relaxed);
    }

    #[test]
    fn kiln_parallel_for_runs_extern_c_tasks() {
        let data: Vec<u64> = (1..=10_000).collect();
        let ctx = &data as *const Vec<u64> as *const kiln_ctx;
        let expected = 10_000 * 10_001 / 2;
        for n in [1, 2, 3] {
            let pool = ThreadPool::new(n);
            FFI_SUM.store(0, Ordering::Relaxed);
            // SAFETY: the pool is alive, and `ffi_task` only reads `data` and an atomic.
            unsafe { kiln_parallel_for(pool.as_ptr(), ffi_task, ctx) };
            assert_eq!(FFI_SUM.load(Ordering::Relaxed), expected);
            // Through a function pointer, as compiled code calls it.
            let entry: abi::kiln_parallel_for_fn = kiln_parallel_for;
            FFI_SUM.store(0, Ordering::Relaxed);
            // SAFETY: as above.
            unsafe { entry(pool.as_ptr(), ffi_task, ctx) };
            assert_eq!(FFI_SUM.load(Ordering::Relaxed), expected);
        }
        FFI_SUM.store(0, Ordering::Relaxed);
        // SAFETY: a null pool runs the task once on this thread.
        unsafe { kiln_parallel_for(std::ptr::null_mut(), ffi_task, ctx) };
        assert_eq!(FFI_SUM.load(Ordering::Relaxed), expected);
    }

    #[test]
    fn drop_joins_workers() {
        let alive = Arc::new(AtomicU32::new(0));
        {
            let pool = ThreadPool::new(4);
            let a = &alive;
            pool.run(&|_, _| {
                a.fetch_add(1, Ordering::SeqCst);
            });
            assert_eq!(alive.load(Ordering::SeqCst), 4);
            // Hold a clone of the shared state to see when the workers let go of theirs.
            let shared = Arc::clone(&pool.shared);
            assert_eq!(Arc::strong_count(&shared), 5);
            drop(pool);
            // Every worker has exited and dropped its reference.
            assert_eq!(Arc::strong_count(&shared), 1);
        }
        // Dropping pools that never ran, or whose workers are parked, also returns.
        drop(ThreadPool::new(3));
        let p = ThreadPool::new(2);
        thread::sleep(SPIN_TIME * 5);
        drop(p);
        drop(ThreadPool::new(1));
    }

    #[test]
    fn worker_panic_is_reraised_without_deadlock() {
        let pool = ThreadPool::new(3);
        let done = AtomicUsize::new(0);
        let r = panic::catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|ith, _| {
                if ith == 2 {
                    panic!("task 2 fails (expected by the test)");
                }
                done.fetch_add(1, Ordering::SeqCst);
            })
        }));
        assert!(r.is_err());
        assert_eq!(done.load(Ordering::SeqCst), 2);
        // Caller-side panic: still waits for the workers, then re-raises.
        let r = panic::catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|ith, _| {
                if ith == 0 {
                    panic!("task 0 fails (expected by the test)");
                }
                thread::sleep(Duration::from_millis(5));
                done.fetch_add(1, Ordering::SeqCst);
            })
        }));
        assert!(r.is_err());
        assert_eq!(done.load(Ordering::SeqCst), 4);
        // The pool is still usable.
        let c = AtomicUsize::new(0);
        pool.run(&|_, _| {
            c.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(c.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn nested_and_concurrent_runs() {
        let pool = ThreadPool::new(2);
        let c = AtomicUsize::new(0);
        pool.run(&|_, _| {
            // Nested: runs both shares inline on this thread.
            pool.run(&|_, _| {
                c.fetch_add(1, Ordering::SeqCst);
            });
        });
        assert_eq!(c.load(Ordering::SeqCst), 4);

        let pool = Arc::new(ThreadPool::new(3));
        let total = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let (pool, total) = (Arc::clone(&pool), Arc::clone(&total));
                thread::spawn(move || {
                    for _ in 0..2000 {
                        pool.run(&|_, _| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(total.load(Ordering::Relaxed), 3 * 2000 * 3);
    }
}
