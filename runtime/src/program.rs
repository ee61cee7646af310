//! Running a compiled model library: the C ABI structs it exports (mirroring
//! `compiler::codegen::abi`), the memory it needs (arena, KV cache, weights), and [`Program`],
//! which calls its `run` entry point on the thread pool.
//!
//! A library is either linked into the executable (the normal case: pass the address of its
//! `kiln_model` symbol to [`Program::new`]) or loaded from a shared object with
//! [`Program::load_shared`] (tests and tools that evaluate many compiled graphs).

use std::alloc::{self, Layout};
use std::ffi::{c_void, CString};
use std::fmt;
use std::path::Path;

use crate::pool::{kiln_parallel_for, ThreadPool};

/// The ABI version this runtime speaks.
pub const ABI_VERSION: u32 = 1;
/// Most inputs plus outputs of a library.
pub const MAX_IO: usize = 8;
pub const DTYPE_I32: u32 = 0;
pub const DTYPE_F32: u32 = 1;

/// `struct kiln_ctx`: the argument of `run`.
#[repr(C)]
#[derive(Debug)]
pub struct KilnCtx {
    pub arena: *mut u8,
    pub weights: *const u8,
    pub kv_cache: *mut f32,
    pub io: *const *mut c_void,
    pub n_tokens: i64,
    pub pos: i64,
    pub out_start: i64,
    pub parallel_for: unsafe extern "C" fn(*mut c_void, crate::pool::TaskFn, *const c_void),
    pub pool: *mut c_void,
}

/// `struct kiln_model_desc`: what a compiled library exports as `kiln_model`.
#[repr(C)]
#[derive(Debug)]
pub struct ModelDesc {
    pub abi_version: u32,
    pub n_inputs: u32,
    pub n_outputs: u32,
    pub batch: u32,
    pub context: u32,
    pub kv_layers: u32,
    pub kv_width: u32,
    pub reserved: u32,
    pub arena_bytes: u64,
    pub kv_bytes: u64,
    pub weights_bytes: u64,
    pub weights_checksum: u64,
    pub weights: *const u8,
    pub run: unsafe extern "C" fn(*const KilnCtx),
    pub io_dtype: [u32; MAX_IO],
    pub io_width: [u32; MAX_IO],
}

// SAFETY: a descriptor is immutable data in the library's read-only section.
unsafe impl Sync for ModelDesc {}

/// Errors of loading or running a compiled library: bad files, mismatched libraries, or
/// arguments outside what the library was compiled for.
#[derive(Debug, Clone, PartialEq)]
pub enum ProgramError {
    Load(String),
    AbiMismatch { found: u32 },
    Weights(String),
    BadArgument(String),
}

impl fmt::Display for ProgramError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProgramError::Load(m) => write!(f, "cannot load the model library: {m}"),
            ProgramError::AbiMismatch { found } => {
                write!(f, "the model library speaks ABI version {found}, this runtime speaks {ABI_VERSION}; rebuild the bundle")
            }
            ProgramError::Weights(m) => write!(f, "weights: {m}"),
            ProgramError::BadArgument(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for ProgramError {}

/// A zeroed, 64-byte aligned heap buffer.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    fn zeroed(bytes: usize) -> Result<Self, ProgramError> {
        let layout = Layout::from_size_align(bytes.max(64), 64)
            .map_err(|_| ProgramError::BadArgument(format!("cannot allocate {bytes} bytes")))?;
        // SAFETY: the layout has a nonzero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(ProgramError::BadArgument(format!("out of memory allocating {bytes} bytes")));
        }
        Ok(AlignedBuf { ptr, layout })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to layout.size() initialized bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}

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

/// One compiled library with its memory, ready to run.
pub struct Program {
    desc: &'static ModelDesc,
    arena: AlignedBuf,
    kv: AlignedBuf,
    external_weights: Option<AlignedBuf>,
    pool: Box<ThreadPool>,
    _lib: Option<SharedLib>,
}

/// One input of a call: token ids or f32 rows.
pub enum Input<'a> {
    I32(&'a [i32]),
    F32(&'a [f32]),
}

/// FNV-1a 64, the weights checksum (same as the compiler's).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

impl Program {
    /// Prepares a library linked into this executable. `weights_file` is needed when the
    /// library was built without embedded weights (`weights.bin` of the bundle).
    pub fn new(desc: &'static ModelDesc, weights_file: Option<&Path>, n_threads: usize) -> Result<Self, ProgramError> {
        Self::with_lib(desc, None, weights_file, n_threads)
    }

    /// Opens a shared object built from a model library (`cc -shared`) and prepares it.
    pub fn load_shared(path: &Path, weights_file: Option<&Path>, n_threads: usize) -> Result<Self, ProgramError> {
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| ProgramError::Load(format!("{} contains a NUL byte", path.display())))?;
        // SAFETY: c_path is a valid C string; dlopen runs the object's initializers, and kiln
        // libraries have none.
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
        // SAFETY: kiln_model is a `struct kiln_model_desc` (checked by its abi_version below),
        // which stays mapped while `lib` lives; the Program owns `lib`, so the 'static borrow
        // never outlives the mapping in practice.
        let desc: &'static ModelDesc = unsafe { &*(sym as *const ModelDesc) };
        Self::with_lib(desc, Some(lib), weights_file, n_threads)
    }

    fn with_lib(
        desc: &'static ModelDesc,
        lib: Option<SharedLib>,
        weights_file: Option<&Path>,
        n_threads: usize,
    ) -> Result<Self, ProgramError> {
        if desc.abi_version != ABI_VERSION {
            return Err(ProgramError::AbiMismatch { found: desc.abi_version });
        }
        if n_threads == 0 || n_threads > 256 {
            return Err(ProgramError::BadArgument(format!("thread count {n_threads} must be in 1..=256")));
        }
        let external_weights = if desc.weights.is_null() {
            let path = weights_file.ok_or_else(|| {
                ProgramError::Weights("the library was built without embedded weights; pass its weights.bin".into())
            })?;
            Some(read_weights(path, desc)?)
        } else {
            None
        };
        Ok(Program {
            desc,
            arena: AlignedBuf::zeroed(desc.arena_bytes as usize)?,
            kv: AlignedBuf::zeroed(desc.kv_bytes as usize)?,
            external_weights,
            pool: Box::new(ThreadPool::new(n_threads)),
            _lib: lib,
        })
    }

    pub fn desc(&self) -> &ModelDesc {
        self.desc
    }

    pub fn n_threads(&self) -> usize {
        self.pool.n_threads()
    }

    /// Bytes of memory this program holds: arena, KV cache, and weights (embedded or loaded).
    pub fn memory_bytes(&self) -> u64 {
        self.desc.arena_bytes + self.desc.kv_bytes + self.desc.weights_bytes
    }

    /// Clears the KV cache.
    pub fn reset(&mut self) {
        self.kv.as_mut_slice().fill(0);
    }

    /// Runs the library on `n_tokens` rows at position `pos`, writing rows
    /// `out_start..n_tokens` of every output (`outputs[k]` holds `n_tokens` rows).
    pub fn run(
        &mut self,
        inputs: &[Input],
        outputs: &mut [&mut [f32]],
        n_tokens: usize,
        pos: usize,
        out_start: usize,
    ) -> Result<(), ProgramError> {
        let d = self.desc;
        let bad = |m: String| Err(ProgramError::BadArgument(m));
        if n_tokens == 0 || n_tokens > d.batch as usize {
            return bad(format!("{n_tokens} tokens in one call; the library takes 1..={}", d.batch));
        }
        if pos + n_tokens > d.context as usize {
            return bad(format!("positions {pos}..{} exceed the context of {}", pos + n_tokens, d.context));
        }
        if out_start > n_tokens {
            return bad(format!("out_start {out_start} > n_tokens {n_tokens}"));
        }
        if inputs.len() != d.n_inputs as usize || outputs.len() != d.n_outputs as usize {
            return bad(format!("the library takes {} inputs and {} outputs", d.n_inputs, d.n_outputs));
        }
        let mut io: Vec<*mut c_void> = Vec::with_capacity(inputs.len() + outputs.len());
        for (slot, input) in inputs.iter().enumerate() {
            let width = d.io_width[slot] as usize;
            let (ptr, len, dtype) = match input {
                Input::I32(x) => (x.as_ptr() as *mut c_void, x.len(), DTYPE_I32),
                Input::F32(x) => (x.as_ptr() as *mut c_void, x.len(), DTYPE_F32),
            };
            if dtype != d.io_dtype[slot] || len != n_tokens * width {
                return bad(format!("input {slot} must be {n_tokens} x {width} values of dtype {}", d.io_dtype[slot]));
            }
            io.push(ptr);
        }
        for (k, out) in outputs.iter_mut().enumerate() {
            let width = d.io_width[inputs.len() + k] as usize;
            if out.len() != n_tokens * width {
                return bad(format!("output {k} must hold {n_tokens} x {width} floats"));
            }
            io.push(out.as_mut_ptr() as *mut c_void);
        }
        let weights = match &self.external_weights {
            Some(w) => w.ptr as *const u8,
            None => d.weights,
        };
        let ctx = KilnCtx {
            arena: self.arena.ptr,
            weights,
            kv_cache: self.kv.ptr as *mut f32,
            io: io.as_ptr(),
            n_tokens: n_tokens as i64,
            pos: pos as i64,
            out_start: out_start as i64,
            parallel_for: kiln_parallel_for,
            pool: self.pool.as_ptr(),
        };
        // SAFETY: every pointer in ctx is valid for the sizes the descriptor declares: the
        // arena and KV cache were allocated from it, the io buffers were checked against its
        // io widths above, n_tokens <= batch and pos + n_tokens <= context were checked, and
        // the weights are the library's own or a file checked against its size and checksum.
        // `self` is borrowed mutably, so no other call uses the arena or cache concurrently.
        unsafe { (d.run)(&ctx) };
        Ok(())
    }
}

/// Reads a weights file into aligned memory and checks it against the descriptor.
fn read_weights(path: &Path, desc: &ModelDesc) -> Result<AlignedBuf, ProgramError> {
    let err = |m: String| ProgramError::Weights(format!("{}: {m}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    if bytes.len() as u64 != desc.weights_bytes {
        return Err(err(format!("{} bytes, the library expects {}", bytes.len(), desc.weights_bytes)));
    }
    if fnv1a64(&bytes) != desc.weights_checksum {
        return Err(err("checksum mismatch: these weights belong to another build".into()));
    }
    let mut buf = AlignedBuf::zeroed(bytes.len())?;
    buf.as_mut_slice()[..bytes.len()].copy_from_slice(&bytes);
    Ok(buf)
}
