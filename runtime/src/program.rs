//! Running a compiled model library: the descriptor it exports (the `abi` crate's
//! `kiln_model_desc`, behind [`ModelDesc`]), the memory it needs (arena, KV cache, weights),
//! and [`Program`], which calls its `run` entry point on the thread pool.
//!
//! A library is either linked into the executable (the normal case: pass the address of its
//! `kiln_model` symbol to [`Program::new`]) or loaded from a shared object with
//! [`Program::load_shared`] (tests and tools that evaluate many compiled graphs).

use std::alloc::{self, Layout};
use std::ffi::{c_void, CString};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

pub use abi::{kiln_ctx as KilnCtx, weights_checksum, ABI_VERSION, DTYPE_F32, DTYPE_I32, FINGERPRINT_BYTES, MAX_IO};

use crate::pool::{kiln_parallel_for, shared_workers, Workers};

/// `struct kiln_model_desc`: what a compiled library exports as `kiln_model`.
///
/// The `abi` crate's struct has private fields and no constructor, and so does this wrapper,
/// so safe code cannot make one: the only way to a `&'static ModelDesc` is `unsafe` code
/// naming a library's `kiln_model` symbol (an `extern` static, or a pointer from C), and that
/// `unsafe` block is where the caller vouches that it is the descriptor of a kiln-compiled
/// library. [`Program`] then checks what can be checked (ABI version, sizes, KV layout,
/// weights checksum) before calling its code.
#[repr(transparent)]
#[derive(Debug)]
pub struct ModelDesc(abi::kiln_model_desc);

/// Whether this CPU has the feature of `cpu_features` bit `bit` (false for the other
/// architecture's features). The strings are `std::arch`'s spellings, not kiln's names.
fn cpu_has(bit: u32) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        match bit {
            abi::KILN_CPU_SSE3 => has!("sse3"),
            abi::KILN_CPU_SSSE3 => has!("ssse3"),
            abi::KILN_CPU_SSE41 => has!("sse4.1"),
            abi::KILN_CPU_SSE42 => has!("sse4.2"),
            abi::KILN_CPU_POPCNT => has!("popcnt"),
            abi::KILN_CPU_AVX => has!("avx"),
            abi::KILN_CPU_AVX2 => has!("avx2"),
            abi::KILN_CPU_FMA => has!("fma"),
            abi::KILN_CPU_BMI1 => has!("bmi1"),
            abi::KILN_CPU_BMI2 => has!("bmi2"),
            abi::KILN_CPU_LZCNT => has!("lzcnt"),
            abi::KILN_CPU_F16C => has!("f16c"),
            _ => false,
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        use std::arch::is_aarch64_feature_detected as has;
        match bit {
            abi::KILN_CPU_DOTPROD => has!("dotprod"),
            abi::KILN_CPU_FP16 => has!("fp16"),
            abi::KILN_CPU_I8MM => has!("i8mm"),
            _ => false,
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = bit;
        false
    }
}

// SAFETY: a descriptor is immutable data in the library's read-only section.
unsafe impl Sync for ModelDesc {}

impl ModelDesc {
    pub fn abi_version(&self) -> u32 {
        self.0.abi_version()
    }

    pub fn n_inputs(&self) -> usize {
        self.0.n_inputs() as usize
    }

    pub fn n_outputs(&self) -> usize {
        self.0.n_outputs() as usize
    }

    /// Most tokens per call.
    pub fn batch(&self) -> usize {
        self.0.batch() as usize
    }

    /// KV cache positions.
    pub fn context(&self) -> usize {
        self.0.context() as usize
    }

    pub fn arena_bytes(&self) -> u64 {
        self.0.arena_bytes()
    }

    pub fn kv_bytes(&self) -> u64 {
        self.0.kv_bytes()
    }

    pub fn weights_bytes(&self) -> u64 {
        self.0.weights_bytes()
    }

    /// Whether the weights are in the library (else they ship as `weights.bin`).
    pub fn embeds_weights(&self) -> bool {
        !self.0.weights().is_null()
    }

    /// dtype code of input/output slot `slot` (inputs first), `None` past the last one.
    pub fn io_dtype(&self, slot: usize) -> Option<u32> {
        (slot < self.n_inputs() + self.n_outputs()).then(|| self.0.io_dtype().get(slot).copied()).flatten()
    }

    /// Values per row of input/output slot `slot` (inputs first), `None` past the last one.
    pub fn io_width(&self, slot: usize) -> Option<usize> {
        (slot < self.n_inputs() + self.n_outputs()).then(|| self.0.io_width().get(slot).map(|&w| w as usize)).flatten()
    }

    /// The build fingerprint (all zeros for a library compiled outside `build_model`).
    pub fn fingerprint(&self) -> &[u8; FINGERPRINT_BYTES] {
        self.0.fingerprint()
    }

    /// The fingerprint in lowercase hex, as `manifest.json` writes it.
    pub fn fingerprint_hex(&self) -> String {
        self.fingerprint().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Checks everything about the descriptor that does not need its code or weights.
    fn check(&self) -> Result<(), ProgramError> {
        let bad = |m: String| Err(ProgramError::BadDescriptor(m));
        let d = &self.0;
        if d.abi_version() != ABI_VERSION {
            return Err(ProgramError::AbiMismatch { found: d.abi_version() });
        }
        if d.run().is_none() {
            return bad("run is NULL".into());
        }
        let n_io = self.n_inputs() + self.n_outputs();
        if d.n_outputs() == 0 || n_io > MAX_IO {
            return bad(format!("{} inputs and {} outputs (1..={MAX_IO} in all)", d.n_inputs(), d.n_outputs()));
        }
        let cpu_features = d.cpu_features();
        if cpu_features & !abi::CPU_FEATURE_MASK != 0 {
            return bad(format!("unknown CPU feature bits {:#x}", cpu_features & !abi::CPU_FEATURE_MASK));
        }
        let missing: Vec<&str> = abi::CPU_FEATURES
            .iter()
            .filter(|&&(bit, _)| cpu_features & bit != 0 && !cpu_has(bit))
            .map(|&(_, name)| name)
            .collect();
        if !missing.is_empty() {
            return Err(ProgramError::UnsupportedCpu(missing.join(", ")));
        }
        if d.batch() == 0 || d.context() == 0 {
            return bad(format!("batch {} and context {} must be nonzero", d.batch(), d.context()));
        }
        for slot in 0..n_io {
            let (dtype, width) = (d.io_dtype()[slot], d.io_width()[slot]);
            if dtype != DTYPE_I32 && dtype != DTYPE_F32 {
                return bad(format!("io slot {slot} has unknown dtype {dtype}"));
            }
            if width == 0 {
                return bad(format!("io slot {slot} has width 0"));
            }
        }
        if d.kv_element_bytes() != 4 && d.kv_element_bytes() != 2 {
            return bad(format!("KV cache elements of {} bytes (f32: 4, f16: 2)", d.kv_element_bytes()));
        }
        let kv = (d.kv_layers() as u64)
            .checked_mul(2)
            .and_then(|x| x.checked_mul(d.context() as u64))
            .and_then(|x| x.checked_mul(d.kv_width() as u64))
            .and_then(|x| x.checked_mul(d.kv_element_bytes() as u64));
        if kv != Some(d.kv_bytes()) {
            return bad(format!(
                "kv_bytes {} is not kv_layers {} x 2 x context {} x kv_width {} x {}",
                d.kv_bytes(),
                d.kv_layers(),
                d.context(),
                d.kv_width(),
                d.kv_element_bytes()
            ));
        }
        for (what, bytes) in
            [("arena_bytes", d.arena_bytes()), ("kv_bytes", d.kv_bytes()), ("weights_bytes", d.weights_bytes())]
        {
            if bytes > isize::MAX as u64 - 64 {
                return bad(format!("{what} {bytes} does not fit this machine's address space"));
            }
        }
        Ok(())
    }
}

/// Errors of loading or running a compiled library: bad files, mismatched libraries, or
/// arguments outside what the library was compiled for.
#[derive(Debug, Clone, PartialEq)]
pub enum ProgramError {
    Load(String),
    AbiMismatch {
        found: u32,
    },
    /// The descriptor is inconsistent: not a kiln library, or a corrupt one.
    BadDescriptor(String),
    /// The library is not the one the caller's bundle was built with.
    Mismatch(String),
    Weights(String),
    BadArgument(String),
    /// The library's code needs CPU features (named) this CPU lacks.
    UnsupportedCpu(String),
}

impl fmt::Display for ProgramError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProgramError::Load(m) => write!(f, "cannot load the model library: {m}"),
            ProgramError::AbiMismatch { found } => {
                write!(f, "the model library speaks ABI version {found}, this runtime speaks {ABI_VERSION}; rebuild the bundle")
            }
            ProgramError::BadDescriptor(m) => write!(f, "the model library's descriptor is invalid: {m}"),
            ProgramError::Mismatch(m) => write!(f, "{m}"),
            ProgramError::Weights(m) => write!(f, "weights: {m}"),
            ProgramError::BadArgument(m) => write!(f, "{m}"),
            ProgramError::UnsupportedCpu(m) => write!(
                f,
                "the model library was compiled for CPU features this CPU lacks ({m}); rebuild it for this \
                 CPU's level (--target / --device)"
            ),
        }
    }
}

impl std::error::Error for ProgramError {}

/// A zeroed, 64-byte aligned buffer. On Linux and Android it is an anonymous private mapping,
/// whose pages the system zero-fills on first touch: a buffer costs resident memory only for
/// the pages used (a KV cache at context 2048 holding 600 positions keeps about 30 % of
/// itself resident). Elsewhere it comes from the allocator, zeroed.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
    mapped: bool,
}

const MAPPED: bool = cfg!(any(target_os = "linux", target_os = "android"));

impl AlignedBuf {
    fn zeroed(bytes: usize) -> Result<Self, ProgramError> {
        let layout = Layout::from_size_align(bytes.max(64), 64)
            .map_err(|_| ProgramError::BadArgument(format!("cannot allocate {bytes} bytes")))?;
        let oom = || ProgramError::BadArgument(format!("out of memory allocating {bytes} bytes"));
        if MAPPED {
            // SAFETY: an anonymous private mapping of a nonzero length at an address of the
            // system's choosing touches no existing memory; the result is checked below.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    layout.size(),
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(oom());
            }
            // Mappings are page-aligned, so 64-byte aligned.
            return Ok(AlignedBuf { ptr: ptr.cast(), layout, mapped: true });
        }
        // SAFETY: the layout has a nonzero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(oom());
        }
        Ok(AlignedBuf { ptr, layout, mapped: false })
    }

    /// Zeroes the buffer. A mapping's pages are handed back with `MADV_DONTNEED`, which for
    /// private anonymous memory makes them read as zeros and stop counting as resident.
    fn clear_and_release(&mut self) {
        if self.mapped {
            // SAFETY: the range is exactly this buffer's own private anonymous mapping, which
            // nothing else borrows (&mut self).
            if unsafe { libc::madvise(self.ptr.cast(), self.layout.size(), libc::MADV_DONTNEED) } == 0 {
                return;
            }
        }
        self.as_mut_slice().fill(0);
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to layout.size() initialized bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: ptr and the size are exactly the mapping made in `zeroed`, unmapped once.
            unsafe { libc::munmap(self.ptr.cast(), self.layout.size()) };
        } else {
            // SAFETY: ptr was allocated with exactly this layout and is freed once.
            unsafe { alloc::dealloc(self.ptr, self.layout) }
        }
    }
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: as for a Box<[u8]>: a shared reference gives no way to write (`as_mut_slice` and
// `clear_and_release` take `&mut self`), so sharing one across threads only shares reads.
unsafe impl Sync for AlignedBuf {}

/// A shared object opened with `dlopen`, closed on drop.
struct SharedLib(*mut c_void);

impl Drop for SharedLib {
    fn drop(&mut self) {
        // SAFETY: the handle came from a successful dlopen and is closed once; the program
        // holding it is dropped first (field order), so no code of the library still runs.
        unsafe {
            libc::dlclose(self.0);
        }
    }
}

// SAFETY: a dlopen handle may be used and closed from any thread.
unsafe impl Send for SharedLib {}
// SAFETY: the handle is only read through a shared reference (never at all after loading);
// it is closed by `drop`, which has it exclusively.
unsafe impl Sync for SharedLib {}

/// A compiled library loaded with its weights and the thread pool its kernels run on: the
/// part of a model that does not change while it runs. Any number of [`Program`]s (each with
/// its own activation arena and KV cache) share one, through an `Arc`, as the C ABI's
/// `kiln_ctx` passes weights, arena and cache separately. Programs may be called from several
/// threads at once; their calls take turns, one whole call at a time: every call already keeps
/// all of the pool's threads busy, and interleaving two calls kernel by kernel (the pool
/// serialises `parallel_for`) only adds hand-offs: measured on `chat serve`, 4 concurrent
/// conversations decoded 40 % fewer tokens/s in total than one.
pub struct Library {
    desc: &'static ModelDesc,
    /// `weights.bin`, mapped read-only, for a library built with `--weights file`.
    external_weights: Option<memmap2::Mmap>,
    /// The threads its kernels run on, shared with every library of this process that asks
    /// for as many (see [`crate::pool::shared_workers`]); one call at a time on them.
    workers: Arc<Workers>,
    _lib: Option<SharedLib>,
}

/// The process's pool of `n_threads` threads (see [`shared_workers`]): what a library runs on,
/// made on first use and shared by every library given it. `n_threads` must be in 1..=256.
pub fn workers(n_threads: usize) -> Result<Arc<Workers>, ProgramError> {
    if n_threads == 0 || n_threads > 256 {
        return Err(ProgramError::BadArgument(format!("thread count {n_threads} must be in 1..=256")));
    }
    Ok(shared_workers(n_threads))
}

/// One conversation's memory on a [`Library`]: an activation arena and a KV cache.
pub struct Program {
    library: Arc<Library>,
    arena: AlignedBuf,
    kv: AlignedBuf,
}

/// One input of a call: token ids or f32 rows.
pub enum Input<'a> {
    I32(&'a [i32]),
    F32(&'a [f32]),
}

impl Library {
    /// Prepares a library linked into this executable. `weights_file` is needed when the
    /// library was built without embedded weights (`weights.bin` of the bundle).
    ///
    /// This is safe because a `&'static ModelDesc` cannot be made by safe code (see
    /// [`ModelDesc`]): whoever turned a `kiln_model` symbol into one vouched for it in an
    /// `unsafe` block. The descriptor is still checked (ABI version, sizes, KV layout, and the
    /// checksum of the weights, embedded or not) before any of its code runs.
    pub fn new(desc: &'static ModelDesc, weights_file: Option<&Path>, n_threads: usize) -> Result<Self, ProgramError> {
        Self::new_in(desc, weights_file, &workers(n_threads)?)
    }

    /// [`Library::new`] on a given thread pool (see [`workers`]), which other libraries may
    /// share: an app with two models (a draft and a target, a device model and a router)
    /// runs both on one set of threads, one call at a time.
    pub fn new_in(
        desc: &'static ModelDesc,
        weights_file: Option<&Path>,
        workers: &Arc<Workers>,
    ) -> Result<Self, ProgramError> {
        Self::with_lib(desc, None, weights_file, Arc::clone(workers), &|_| Ok(()))
    }

    /// Opens a shared object built from a model library (`cc -shared`) and prepares it.
    ///
    /// Loading a shared object runs code from it (its ELF initializers, as `dlopen` does in
    /// any plugin host), so `path` must name a library you would run: this function is safe
    /// in the sense that a kiln library built by `build_model` or `compiler::compile` cannot
    /// cause undefined behaviour through it, not in the sense that any file is harmless. What
    /// can be checked is checked before the library's `run` is ever called: the descriptor is
    /// aligned and lies in the loaded object, its `run` and weights lie in the same object,
    /// the descriptor is consistent (see [`Program::new`]), and the weights match their
    /// checksum. `Model::open_shared` also checks the build fingerprint against the bundle.
    pub fn load_shared(path: &Path, weights_file: Option<&Path>, n_threads: usize) -> Result<Self, ProgramError> {
        Self::load_shared_checked(path, weights_file, n_threads, &|_| Ok(()))
    }

    /// [`Library::load_shared`] with an extra check of the descriptor (the session's
    /// fingerprint check), made before anything else is read or allocated.
    pub(crate) fn load_shared_checked(
        path: &Path,
        weights_file: Option<&Path>,
        n_threads: usize,
        check: &dyn Fn(&ModelDesc) -> Result<(), ProgramError>,
    ) -> Result<Self, ProgramError> {
        let workers = workers(n_threads)?;
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| ProgramError::Load(format!("{} contains a NUL byte", path.display())))?;
        // SAFETY: c_path is a valid C string. dlopen runs the object's initializers: the
        // caller names a library it trusts to run (see the doc comment); kiln libraries have
        // none of their own.
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            // SAFETY: dlerror returns a thread-local C string or null.
            let msg = unsafe {
                let e = libc::dlerror();
                if e.is_null() {
                    "unknown dlopen error".to_string()
                } else {
                    std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
                }
            };
            return Err(ProgramError::Load(msg));
        }
        let lib = SharedLib(handle);
        // SAFETY: the symbol name is a valid C string and the handle is open.
        let sym = unsafe { libc::dlsym(lib.0, c"kiln_model".as_ptr()) };
        if sym.is_null() {
            return Err(ProgramError::Load(format!("{} has no kiln_model symbol", path.display())));
        }
        if !(sym as usize).is_multiple_of(std::mem::align_of::<ModelDesc>()) {
            return Err(ProgramError::Load(format!("{}: kiln_model is misaligned", path.display())));
        }
        let base = object_base(sym)
            .ok_or_else(|| ProgramError::Load(format!("{}: kiln_model is not in a loaded object", path.display())))?;
        // SAFETY: kiln_model is an aligned symbol of the object the caller vouched is a kiln
        // library, so it is a `struct kiln_model_desc`; it stays mapped while `lib` lives, and
        // the Library owns `lib` (dropped after every use of `desc`), so the 'static borrow
        // never outlives the mapping. Its fields are checked before anything relies on them.
        let desc: &'static ModelDesc = unsafe { &*(sym as *const ModelDesc) };
        if desc.abi_version() != ABI_VERSION {
            return Err(ProgramError::AbiMismatch { found: desc.abi_version() });
        }
        let run = desc.0.run().map_or(std::ptr::null(), |run| run as *const c_void);
        let weights = desc.0.weights();
        if object_base(run) != Some(base) || (!weights.is_null() && object_base(weights.cast()) != Some(base)) {
            return Err(ProgramError::BadDescriptor(format!(
                "{}: kiln_model points outside its own library",
                path.display()
            )));
        }
        Self::with_lib(desc, Some(lib), weights_file, workers, check)
    }

    fn with_lib(
        desc: &'static ModelDesc,
        lib: Option<SharedLib>,
        weights_file: Option<&Path>,
        workers: Arc<Workers>,
        check: &dyn Fn(&ModelDesc) -> Result<(), ProgramError>,
    ) -> Result<Self, ProgramError> {
        desc.check()?;
        check(desc)?;
        let external_weights = match (desc.0.weights().is_null(), weights_file) {
            (true, Some(path)) => Some(read_weights(path, desc)?),
            (true, None) => {
                return Err(ProgramError::Weights(
                    "the library was built with `--weights file` and needs the weights.bin of its bundle, \
                     but no weights file was given"
                        .into(),
                ))
            }
            (false, Some(path)) => {
                return Err(ProgramError::Weights(format!(
                    "the library embeds its weights, but a weights file ({}) was given",
                    path.display()
                )))
            }
            (false, None) => {
                // SAFETY: the descriptor is a kiln library's (see `Library::new` and
                // `load_shared`), whose `weights` points at `weights_bytes` bytes of its
                // read-only data; `check` bounded `weights_bytes` by isize::MAX.
                let embedded = unsafe { std::slice::from_raw_parts(desc.0.weights(), desc.weights_bytes() as usize) };
                if weights_checksum(embedded) != desc.0.weights_checksum() {
                    return Err(ProgramError::Weights(
                        "the embedded weights do not match their checksum: the library is corrupt".into(),
                    ));
                }
                None
            }
        };
        Ok(Library { desc, external_weights, workers, _lib: lib })
    }

    pub fn desc(&self) -> &ModelDesc {
        self.desc
    }

    pub fn n_threads(&self) -> usize {
        self.workers.pool.n_threads()
    }

    /// Bytes of weights this library holds (embedded or loaded from a file).
    pub fn weights_bytes(&self) -> u64 {
        self.desc.weights_bytes()
    }

    fn weights(&self) -> *const u8 {
        match &self.external_weights {
            Some(w) => w.as_ptr(),
            None => self.desc.0.weights(),
        }
    }
}

impl Program {
    /// A library linked into this executable with one arena and cache: [`Library::new`] and
    /// [`Program::on`].
    pub fn new(desc: &'static ModelDesc, weights_file: Option<&Path>, n_threads: usize) -> Result<Self, ProgramError> {
        Self::on(Arc::new(Library::new(desc, weights_file, n_threads)?))
    }

    /// A shared object with one arena and cache: [`Library::load_shared`] and [`Program::on`].
    pub fn load_shared(path: &Path, weights_file: Option<&Path>, n_threads: usize) -> Result<Self, ProgramError> {
        Self::on(Arc::new(Library::load_shared(path, weights_file, n_threads)?))
    }

    /// A fresh arena and an empty KV cache on `library`, which other programs may share.
    pub fn on(library: Arc<Library>) -> Result<Self, ProgramError> {
        let desc = library.desc;
        Ok(Program {
            arena: AlignedBuf::zeroed(desc.arena_bytes() as usize)?,
            kv: AlignedBuf::zeroed(desc.kv_bytes() as usize)?,
            library,
        })
    }

    /// The library this program runs, shared with any other program made on it.
    pub fn library(&self) -> &Arc<Library> {
        &self.library
    }

    pub fn desc(&self) -> &ModelDesc {
        self.library.desc
    }

    pub fn n_threads(&self) -> usize {
        self.library.n_threads()
    }

    /// The KV cache as the library left it (per layer, `context` rows of keys, then of values,
    /// each `kv_width` elements of `kv_element_bytes`): for inspection and tests.
    pub fn kv_cache(&mut self) -> &[u8] {
        self.kv.as_mut_slice()
    }

    /// Bytes of memory this program uses: arena, KV cache, and the weights (embedded or
    /// loaded), which programs on the same [`Library`] share.
    pub fn memory_bytes(&self) -> u64 {
        let d = self.library.desc;
        d.arena_bytes() + d.kv_bytes() + d.weights_bytes()
    }

    /// Clears the KV cache and gives its memory back to the system: the pages are zero again
    /// on their next use, so a conversation that reaches position `p` holds only the cache
    /// pages of positions `0..p` (writing zeros would keep the whole cache resident).
    pub fn reset(&mut self) {
        self.kv.clear_and_release();
    }

    /// Runs the library on `n_tokens` rows at position `pos`, computing only rows
    /// `out_start..n_tokens` of every output: `outputs[k]` holds those `n_tokens - out_start`
    /// rows (at `out_start = n_tokens - 1`, generation's case, one row of logits).
    pub fn run(
        &mut self,
        inputs: &[Input],
        outputs: &mut [&mut [f32]],
        n_tokens: usize,
        pos: usize,
        out_start: usize,
    ) -> Result<(), ProgramError> {
        let d = self.library.desc;
        let bad = |m: String| Err(ProgramError::BadArgument(m));
        if n_tokens == 0 || n_tokens > d.batch() {
            return bad(format!("{n_tokens} tokens in one call; the library takes 1..={}", d.batch()));
        }
        // Checked: a position near usize::MAX must not wrap around into range.
        if pos.checked_add(n_tokens).is_none_or(|end| end > d.context()) {
            return bad(format!("{n_tokens} tokens at position {pos} exceed the context of {}", d.context()));
        }
        if out_start > n_tokens {
            return bad(format!("out_start {out_start} > n_tokens {n_tokens}"));
        }
        if inputs.len() != d.n_inputs() || outputs.len() != d.n_outputs() {
            return bad(format!("the library takes {} inputs and {} outputs", d.n_inputs(), d.n_outputs()));
        }
        let mut io: Vec<*mut c_void> = Vec::with_capacity(inputs.len() + outputs.len());
        for (slot, input) in inputs.iter().enumerate() {
            let (width, want) = (d.0.io_width()[slot] as usize, d.0.io_dtype()[slot]);
            let (ptr, len, dtype) = match input {
                Input::I32(x) => (x.as_ptr() as *mut c_void, x.len(), DTYPE_I32),
                Input::F32(x) => (x.as_ptr() as *mut c_void, x.len(), DTYPE_F32),
            };
            if dtype != want || Some(len) != n_tokens.checked_mul(width) {
                return bad(format!("input {slot} must be {n_tokens} x {width} values of dtype {want}"));
            }
            io.push(ptr);
        }
        let out_rows = n_tokens - out_start;
        for (k, out) in outputs.iter_mut().enumerate() {
            let width = d.0.io_width()[inputs.len() + k] as usize;
            if Some(out.len()) != out_rows.checked_mul(width) {
                return bad(format!("output {k} must hold {out_rows} x {width} floats (rows {out_start}..{n_tokens})"));
            }
            io.push(out.as_mut_ptr() as *mut c_void);
        }
        // `check` refused a descriptor without one at construction.
        let run = d.0.run().ok_or_else(|| ProgramError::BadDescriptor("run is NULL".into()))?;
        let ctx = KilnCtx {
            arena: self.arena.ptr,
            weights: self.library.weights(),
            kv_cache: self.kv.ptr as *mut c_void,
            io: io.as_ptr(),
            n_tokens: n_tokens as i64,
            pos: pos as i64,
            out_start: out_start as i64,
            parallel_for: kiln_parallel_for,
            pool: self.library.workers.pool.as_ptr(),
        };
        // SAFETY: the descriptor is a kiln library's (see `Program::new`), checked for
        // consistency at construction. Every pointer in ctx is valid for the sizes it
        // declares: the arena and KV cache were allocated from it, the io buffers were checked
        // against its io widths above (with checked multiplication), n_tokens <= batch and
        // pos + n_tokens <= context were checked without overflow (so both fit i64), and the
        // weights are the library's own or a file, either checked against size and checksum
        // at construction. `self` is borrowed mutably, so no other call uses the arena or
        // cache concurrently; what calls on other programs share (weights, code, pool) is
        // only read, and one call runs at a time (`turn`).
        let _turn = self.library.workers.turn.lock().unwrap_or_else(|e| e.into_inner());
        unsafe { run(&ctx) };
        Ok(())
    }
}

/// The base address of the loaded object holding `addr`, if any.
fn object_base(addr: *const c_void) -> Option<usize> {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: dladdr only reads the loader's tables and writes `info`.
    let found = unsafe { libc::dladdr(addr, info.as_mut_ptr()) };
    if found == 0 {
        return None;
    }
    // SAFETY: dladdr succeeded, so it filled `info` (and it was zeroed before).
    let info = unsafe { info.assume_init() };
    (!info.dli_fbase.is_null()).then_some(info.dli_fbase as usize)
}

/// Maps a weights file read-only and checks it against the descriptor, without copying it:
/// its pages are read on first use and shared with every process that maps the same file
/// (serve's sessions, several apps using one bundle), and resident memory is what the
/// kernels touch, as with llama.cpp's mmap.
fn read_weights(path: &Path, desc: &ModelDesc) -> Result<memmap2::Mmap, ProgramError> {
    let err = |m: String| ProgramError::Weights(format!("{}: {m}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let meta = file.metadata().map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.len() != desc.weights_bytes() {
        return Err(err(format!("{} bytes, the library expects {}", meta.len(), desc.weights_bytes())));
    }
    if meta.len() == 0 {
        return Err(err("empty (no weights)".into()));
    }
    // SAFETY: a private read-only mapping of a regular file of the checked length. Nothing in
    // this process writes through it (the kernels only read weights). Another process
    // truncating or rewriting the file while it is mapped would change or remove pages under
    // us; like llama.cpp with its mmap, kiln assumes a bundle's weights.bin is not modified
    // while a model uses it (kiln itself never rewrites a bundle in place: builds replace
    // whole output directories).
    let map = unsafe { memmap2::MmapOptions::new().map_copy_read_only(&file) }.map_err(|e| err(e.to_string()))?;
    if map.len() as u64 != desc.weights_bytes() {
        return Err(err(format!("mapped {} bytes, the library expects {}", map.len(), desc.weights_bytes())));
    }
    if weights_checksum(&map) != desc.0.weights_checksum() {
        return Err(err("checksum mismatch: these weights belong to another build".into()));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::AlignedBuf;

    fn resident_kib() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    #[test]
    fn clearing_zeroes_every_byte_and_releases_the_pages() {
        // Odd sizes so that the buffer starts and ends inside pages whichever way it lands.
        for bytes in [100, 4096 * 3 + 17, 64 << 20] {
            let mut buf = AlignedBuf::zeroed(bytes).unwrap();
            buf.as_mut_slice().fill(0xA5);
            let before = resident_kib();
            buf.clear_and_release();
            let after = resident_kib();
            let data = buf.as_mut_slice();
            assert!(data.iter().all(|&b| b == 0), "{bytes} bytes: a nonzero byte after clearing");
            if bytes == 64 << 20 {
                // 64 MiB written then released: the process must shrink by most of it. Other
                // tests run in parallel threads of this process, so allow them 16 MiB of noise.
                if let (Some(before), Some(after)) = (before, after) {
                    assert!(before > after + 48 * 1024, "resident {before} KiB -> {after} KiB after clearing");
                }
            }
            data.fill(1);
            assert!(data.iter().all(|&b| b == 1));
        }
    }
}
