//! A bounded, typed reader for GGUF (versions 2 and 3) model files, and a small writer.
//!
//! GGUF is the container llama.cpp uses: a header, typed key/value metadata (architecture
//! hyper-parameters, the tokenizer vocabulary, the chat template), tensor descriptions, and an
//! aligned data section holding the (possibly block-quantized) weights. kiln's frontend reads
//! the model's shape and weights from it.
//!
//! A model file is untrusted input, so the reader is written to fail cleanly on anything
//! malformed instead of panicking or allocating without bound:
//! - every length and count is checked against the bytes that remain *before* anything is
//!   allocated, and the total number of metadata values is capped ([`MAX_META_VALUES`]);
//! - nested arrays are limited to [`MAX_ARRAY_DEPTH`] levels and tensors to [`MAX_DIMS`]
//!   dimensions; dimension products use checked arithmetic;
//! - every tensor's data range is validated (aligned, inside the file, non-overlapping) at
//!   parse time, so [`GgufFile::tensor_data`] can hand out slices without further checks;
//! - duplicate keys and tensor names, unknown value or tensor types, bad UTF-8 and invalid
//!   `general.alignment` values are errors that name the key or tensor and the byte offset.
//!
//! - absurd counts (tensors, metadata entries, array values) are refused as too large before
//!   they are compared with the file size, and nothing is reserved from a count beyond a small
//!   bound: lists grow as their elements are actually read;
//! - keys, names and string values from the file are clipped in error messages ([`clip`]).
//!
//! [`GgufFile::open`] maps the file read-only (the one mapping helper,
//! `source::files::map_file`) rather than reading it: a model of several gigabytes costs no
//! memory until a tensor's pages are read, and a build gives each tensor's pages back once it is
//! packed ([`GgufFile::release`]). It opens regular files only (a FIFO or `/dev/zero` would
//! block or never end), and tensors are handed out as slices of the mapping, never copied.
//! [`GgufFile::parse`] reads a file already in memory (tests, fuzzing).
//!
//! [`GgufWriter`] produces valid GGUF v3 files (to memory or any `Write`); it is the one writer:
//! `cargo xtask optimize` writes models with it, the tests synthetic ones. It writes what it
//! is given: its callers check shapes against data lengths.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use ir::quant::QuantFormat;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of metadata arrays accepted (an array of arrays has depth 2).
pub const MAX_ARRAY_DEPTH: usize = 4;
/// Most metadata array elements accepted in one file, summed over all arrays. Every element
/// becomes a [`MetaValue`] in memory (32 bytes), so this bounds the parser's memory use
/// independently of the file size; real vocabularies need a few hundred thousand.
pub const MAX_META_VALUES: u64 = 1 << 24;
/// Most metadata entries accepted in one file (real models have a few dozen).
pub const MAX_META_ENTRIES: u64 = 1 << 20;
/// Most tensors accepted in one file (real models have hundreds to a few thousand).
pub const MAX_TENSORS: u64 = 1 << 20;
/// Most elements reserved up front for a list whose length comes from the file; longer lists
/// grow as their elements are actually read, so memory follows the bytes that exist.
const PREALLOC_LIMIT: u64 = 4096;
/// Longest key, name or string value echoed whole into an error message.
pub const MESSAGE_STRING_LIMIT: usize = 64;

/// `s` for an error message: whole when short, else its first [`MESSAGE_STRING_LIMIT`] bytes
/// (cut at a character boundary) and its length, so a huge key or value from a file cannot
/// flood a message.
pub fn clip(s: &str) -> String {
    if s.len() <= MESSAGE_STRING_LIMIT {
        return s.to_owned();
    }
    let mut end = MESSAGE_STRING_LIMIT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}

/// A metadata value for an error message, with its type: `7 (u32)`, `"linear" (string)`,
/// `an array of 3 string`. Strings are clipped (see [`clip`]).
pub fn describe_value(v: &MetaValue) -> String {
    match v {
        MetaValue::String(s) => format!("{:?} (string)", clip(s)),
        MetaValue::Array(items) => match items.first() {
            None => "an empty array".to_owned(),
            Some(first) => format!("an array of {} {}", items.len(), first.type_name()),
        },
        MetaValue::U8(x) => format!("{x} (u8)"),
        MetaValue::I8(x) => format!("{x} (i8)"),
        MetaValue::U16(x) => format!("{x} (u16)"),
        MetaValue::I16(x) => format!("{x} (i16)"),
        MetaValue::U32(x) => format!("{x} (u32)"),
        MetaValue::I32(x) => format!("{x} (i32)"),
        MetaValue::U64(x) => format!("{x} (u64)"),
        MetaValue::I64(x) => format!("{x} (i64)"),
        MetaValue::F32(x) => format!("{x} (f32)"),
        MetaValue::F64(x) => format!("{x} (f64)"),
        MetaValue::Bool(x) => format!("{x} (bool)"),
    }
}

/// Smallest possible encoding of one metadata entry: empty key (8-byte length), value type
/// (4 bytes), one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest possible encoding of one tensor info: empty name, n_dims, type, offset (a tensor
/// with zero dimensions is rejected, but the bound only has to be an underestimate).
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

// ---------------------------------------------------------------------------------------------
// ggml tensor types
// ---------------------------------------------------------------------------------------------

/// A ggml tensor element type, as stored in GGUF tensor infos.
///
/// Every type the GGUF format defines (up to MXFP4) is known, with its block geometry, so that
/// files using them can be parsed and described; only some are supported by kiln's code
/// generator (see [`GgmlType::quant_format`]).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    /// kiln's own 2-bit format (`ir::quant`'s q2_g64), not ggml's: GGUF files holding it are
    /// kiln's own.
    KilnQ2G64,
    /// kiln's own 3-bit format (q3_g64).
    KilnQ3G64,
}

/// (type, ggml id, ggml name, values per block, bytes per block), from ggml / gguf-py
/// (`GGML_QUANT_SIZES`). Ids 4, 5 (Q4_2, Q4_3), 31–33 and 36–38 (removed repacked formats)
/// are retired and unknown here. The last rows are kiln's own formats, at ids far above
/// ggml's (llama.cpp and gguf-py refuse files holding them).
const GGML_TYPES: [(GgmlType, u32, &str, usize, usize); 34] = [
    (GgmlType::F32, 0, "f32", 1, 4),
    (GgmlType::F16, 1, "f16", 1, 2),
    (GgmlType::Q4_0, 2, "q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "q8_0", 32, 34),
    // gguf-py's file size (f32 d, f32 s); ggml's in-memory block is 36 bytes.
    (GgmlType::Q8_1, 9, "q8_1", 32, 40),
    (GgmlType::Q2_K, 10, "q2_K", 256, 84),
    (GgmlType::Q3_K, 11, "q3_K", 256, 110),
    (GgmlType::Q4_K, 12, "q4_K", 256, 144),
    (GgmlType::Q5_K, 13, "q5_K", 256, 176),
    (GgmlType::Q6_K, 14, "q6_K", 256, 210),
    (GgmlType::Q8_K, 15, "q8_K", 256, 292),
    (GgmlType::IQ2_XXS, 16, "iq2_xxs", 256, 66),
    (GgmlType::IQ2_XS, 17, "iq2_xs", 256, 74),
    (GgmlType::IQ3_XXS, 18, "iq3_xxs", 256, 98),
    (GgmlType::IQ1_S, 19, "iq1_s", 256, 50),
    (GgmlType::IQ4_NL, 20, "iq4_nl", 32, 18),
    (GgmlType::IQ3_S, 21, "iq3_s", 256, 110),
    (GgmlType::IQ2_S, 22, "iq2_s", 256, 82),
    (GgmlType::IQ4_XS, 23, "iq4_xs", 256, 136),
    (GgmlType::I8, 24, "i8", 1, 1),
    (GgmlType::I16, 25, "i16", 1, 2),
    (GgmlType::I32, 26, "i32", 1, 4),
    (GgmlType::I64, 27, "i64", 1, 8),
    (GgmlType::F64, 28, "f64", 1, 8),
    (GgmlType::IQ1_M, 29, "iq1_m", 256, 56),
    (GgmlType::BF16, 30, "bf16", 1, 2),
    (GgmlType::TQ1_0, 34, "tq1_0", 256, 54),
    (GgmlType::TQ2_0, 35, "tq2_0", 256, 66),
    (GgmlType::MXFP4, 39, "mxfp4", 32, 17),
    (GgmlType::KilnQ2G64, ir::quant::KILN_Q2_G64, "q2_g64", 64, 20),
    (GgmlType::KilnQ3G64, ir::quant::KILN_Q3_G64, "q3_g64", 64, 28),
];

impl GgmlType {
    /// Every known type, in id order.
    pub const ALL: [GgmlType; 34] = {
        let mut all = [GgmlType::F32; 34];
        let mut i = 0;
        while i < 34 {
            all[i] = GGML_TYPES[i].0;
            i += 1;
        }
        all
    };

    fn row(self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        // The table is indexed by enum declaration order, which matches the table order.
        &GGML_TYPES[self as usize]
    }

    /// The type with ggml id `id`, or `None` for unknown or retired ids.
    pub fn from_id(id: u32) -> Option<Self> {
        GGML_TYPES.iter().find(|row| row.1 == id).map(|row| row.0)
    }

    /// The ggml id stored in GGUF files.
    pub fn id(self) -> u32 {
        self.row().1
    }

    /// ggml's name for the type (`"q4_1"`, `"q6_K"`).
    pub fn name(self) -> &'static str {
        self.row().2
    }

    /// Values per block (1 for scalar types).
    pub fn block_values(self) -> usize {
        self.row().3
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.row().4
    }

    /// The kiln weight format for this type, or `None` when kiln cannot compile it.
    pub fn quant_format(self) -> Option<QuantFormat> {
        QuantFormat::from_ggml_type(self.id())
    }

    /// Bytes taken by `n_values` values, or `None` on overflow or when `n_values` is not a
    /// whole number of blocks.
    pub fn bytes_for(self, n_values: u64) -> Option<u64> {
        let bv = self.block_values() as u64;
        if !n_values.is_multiple_of(bv) {
            return None;
        }
        (n_values / bv).checked_mul(self.block_bytes() as u64)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------------------------

/// A typed GGUF metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// GGUF metadata value type ids.
mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// Smallest encoded size of one value of GGUF value type `ty`, or `None` for unknown types.
fn min_value_bytes(ty: u32) -> Option<u64> {
    use value_type::*;
    Some(match ty {
        U8 | I8 | BOOL => 1,
        U16 | I16 => 2,
        U32 | I32 | F32 => 4,
        U64 | I64 | F64 => 8,
        STRING => 8,
        ARRAY => 4 + 8,
        _ => return None,
    })
}

impl MetaValue {
    /// The GGUF value type id of this value.
    pub fn type_id(&self) -> u32 {
        use value_type::*;
        match self {
            Self::U8(_) => U8,
            Self::I8(_) => I8,
            Self::U16(_) => U16,
            Self::I16(_) => I16,
            Self::U32(_) => U32,
            Self::I32(_) => I32,
            Self::F32(_) => F32,
            Self::Bool(_) => BOOL,
            Self::String(_) => STRING,
            Self::Array(_) => ARRAY,
            Self::U64(_) => U64,
            Self::I64(_) => I64,
            Self::F64(_) => F64,
        }
    }

    /// A short lowercase name of the value's type (`"u32"`, `"string"`, `"array"`).
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "u8",
            Self::I8(_) => "i8",
            Self::U16(_) => "u16",
            Self::I16(_) => "i16",
            Self::U32(_) => "u32",
            Self::I32(_) => "i32",
            Self::F32(_) => "f32",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
            Self::U64(_) => "u64",
            Self::I64(_) => "i64",
            Self::F64(_) => "f64",
        }
    }

    /// The value as a signed 128-bit integer, if it is of an integer type.
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            Self::U8(v) => v.into(),
            Self::I8(v) => v.into(),
            Self::U16(v) => v.into(),
            Self::I16(v) => v.into(),
            Self::U32(v) => v.into(),
            Self::I32(v) => v.into(),
            Self::U64(v) => v.into(),
            Self::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The string, if this is a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if this is an array value.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Everything that can go wrong reading a GGUF file or looking things up in it.
#[derive(Debug)]
pub enum GgufError {
    /// The file could not be read.
    Io { path: PathBuf, source: std::io::Error },
    /// The path names a directory, device, FIFO or socket, not a regular file.
    NotAFile { path: PathBuf, kind: &'static str },
    /// The file does not start with `GGUF`.
    BadMagic { found: Vec<u8> },
    /// A GGUF version other than 2 or 3 (version 1 used 32-bit counts and is not supported).
    UnsupportedVersion { version: u32 },
    /// The file ends (or a declared length or count runs past its end) while reading `what`.
    Truncated { what: String, offset: u64 },
    /// A count exceeds a fixed sanity limit (not the file size: that is [`GgufError::Truncated`]).
    TooLarge { what: String, value: u64, limit: u64, offset: u64 },
    /// The metadata arrays hold more than [`MAX_META_VALUES`] values in total. `key` is the key
    /// holding the most (`holds` values); `next` is the key (and its declared count) whose array
    /// went over the limit, when that is another key.
    TooManyMetaValues { key: String, holds: u64, limit: u64, offset: u64, next: Option<(String, u64)> },
    /// A string is not valid UTF-8.
    InvalidUtf8 { what: String, offset: u64 },
    /// A metadata value (or array element) type id outside 0..=12.
    UnknownValueType { key: String, type_id: u32, offset: u64 },
    /// Metadata arrays nested deeper than [`MAX_ARRAY_DEPTH`].
    ArrayTooDeep { key: String, offset: u64 },
    /// A bool stored as a byte other than 0 or 1.
    InvalidBool { key: String, byte: u8, offset: u64 },
    /// The same metadata key appears twice.
    DuplicateKey { key: String, offset: u64 },
    /// The same tensor name appears twice.
    DuplicateTensor { tensor: String, offset: u64 },
    /// `general.alignment` is not a nonzero power of two (or not an integer).
    BadAlignment { value: String },
    /// A tensor has zero or more than [`MAX_DIMS`] dimensions, or a zero dimension.
    InvalidDims { tensor: String, reason: String, offset: u64 },
    /// The product of a tensor's dimensions (or its byte size) overflows 64 bits.
    DimsOverflow { tensor: String, offset: u64 },
    /// A tensor type id that is not a known ggml type.
    UnknownTensorType { tensor: String, type_id: u32 },
    /// A tensor's row length is not a whole number of blocks of its type.
    NotBlockMultiple { tensor: String, ggml_type: GgmlType, dim0: u64, block_values: usize },
    /// A tensor's offset is not a multiple of the file's alignment.
    MisalignedTensor { tensor: String, offset: u64, alignment: u64 },
    /// A tensor's data runs past the end of the file.
    TensorOutOfBounds { tensor: String, start: u64, end: u64, file_len: u64 },
    /// Two tensors' data ranges overlap.
    OverlappingTensors { first: String, second: String },
    /// A metadata key looked up by the caller is absent.
    MissingKey { key: String },
    /// A metadata key has a different type than the caller asked for.
    WrongKeyType { key: String, expected: &'static str, found: String },
    /// A metadata integer does not fit the type the caller asked for.
    OutOfRange { key: String, expected: &'static str, value: String },
    /// A tensor looked up by the caller is absent.
    MissingTensor { name: String },
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { path, source } => write!(f, "cannot read gguf file {}: {source}", path.display()),
            Self::NotAFile { path, kind } => {
                write!(f, "cannot read gguf file {}: it is a {kind}, not a regular file", path.display())
            }
            Self::BadMagic { found } => {
                write!(f, "not a gguf file: magic is {found:02x?}, expected \"GGUF\"")
            }
            Self::UnsupportedVersion { version } => write!(
                f,
                "unsupported gguf version {version} (supported: 2, 3; a huge number suggests a big-endian file)"
            ),
            Self::Truncated { what, offset } => {
                write!(f, "gguf file truncated at byte {offset} while reading {what}")
            }
            Self::TooLarge { what, value, limit, offset } => {
                write!(f, "{what} at byte {offset} is too large: {value} (limit {limit})")
            }
            Self::TooManyMetaValues { key, holds, limit, offset, next } => match next {
                None => write!(
                    f,
                    "metadata key {key:?} holds {holds} array values (array at byte {offset}), more than the limit of \
                     {limit} per file"
                ),
                Some((next, declared)) => write!(
                    f,
                    "metadata key {key:?} holds {holds} array values, using up the limit of {limit} per file \
                     (metadata key {next:?} at byte {offset} declares {declared} more)"
                ),
            },
            Self::InvalidUtf8 { what, offset } => {
                write!(f, "{what} at byte {offset} is not valid utf-8")
            }
            Self::UnknownValueType { key, type_id, offset } => {
                write!(f, "metadata key {key:?} has unknown value type {type_id} at byte {offset}")
            }
            Self::ArrayTooDeep { key, offset } => {
                write!(f, "metadata key {key:?} nests arrays deeper than {MAX_ARRAY_DEPTH} levels at byte {offset}")
            }
            Self::InvalidBool { key, byte, offset } => {
                write!(f, "metadata key {key:?} has bool byte {byte} (not 0 or 1) at byte {offset}")
            }
            Self::DuplicateKey { key, offset } => {
                write!(f, "duplicate metadata key {key:?} at byte {offset}")
            }
            Self::DuplicateTensor { tensor, offset } => {
                write!(f, "duplicate tensor name {tensor:?} at byte {offset}")
            }
            Self::BadAlignment { value } => {
                write!(f, "general.alignment must be a nonzero power of two, found {value}")
            }
            Self::InvalidDims { tensor, reason, offset } => {
                write!(f, "tensor {tensor:?} at byte {offset}: {reason}")
            }
            Self::DimsOverflow { tensor, offset } => {
                write!(f, "tensor {tensor:?} at byte {offset}: size of its dimensions overflows 64 bits")
            }
            Self::UnknownTensorType { tensor, type_id } => {
                write!(f, "tensor {tensor:?} has unknown ggml type id {type_id}")
            }
            Self::NotBlockMultiple { tensor, ggml_type, dim0, block_values } => write!(
                f,
                "tensor {tensor:?}: row length {dim0} is not a multiple of the {ggml_type} block size {block_values}"
            ),
            Self::MisalignedTensor { tensor, offset, alignment } => {
                write!(f, "tensor {tensor:?}: data offset {offset} is not a multiple of the alignment {alignment}")
            }
            Self::TensorOutOfBounds { tensor, start, end, file_len } => {
                write!(f, "tensor {tensor:?}: data bytes {start}..{end} lie outside the file ({file_len} bytes)")
            }
            Self::OverlappingTensors { first, second } => {
                write!(f, "tensors {first:?} and {second:?} have overlapping data")
            }
            Self::MissingKey { key } => write!(f, "missing metadata key {key:?}"),
            Self::WrongKeyType { key, expected, found } => {
                write!(f, "metadata key {key:?} should be {expected}, found {found}")
            }
            Self::OutOfRange { key, expected, value } => {
                write!(f, "metadata key {key:?} value {value} does not fit {expected}")
            }
            Self::MissingTensor { name } => write!(f, "missing tensor {name:?}"),
        }
    }
}

impl std::error::Error for GgufError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// One tensor's description from the GGUF header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, fastest-varying first (`dims[0]` is the row length).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of values in the tensor (cannot overflow: checked at parse time).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d))
    }
}

/// A GGUF file's bytes: read into memory, or mapped from the file.
enum FileBytes {
    Owned(Vec<u8>),
    Mapped(crate::source::files::Mapped),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Owned(b) => b,
            FileBytes::Mapped(m) => m,
        }
    }
}

/// A parsed GGUF file, owning (or mapping) its bytes.
pub struct GgufFile {
    pub version: u32,
    /// Alignment of the data section and tensor offsets.
    pub alignment: u64,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
    bytes: FileBytes,
    data_start: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .field("data_start", &self.data_start)
            .field("file_len", &self.bytes.len())
            .finish()
    }
}

/// The metadata array values still allowed in a file ([`MAX_META_VALUES`]), and who used them.
struct MetaBudget {
    limit: u64,
    left: u64,
    /// Values held by the key being read (all its arrays, nested ones included).
    current: u64,
    /// The key holding the most values so far, and how many.
    largest: Option<(String, u64)>,
}

impl MetaBudget {
    fn new(limit: u64) -> Self {
        MetaBudget { limit, left: limit, current: 0, largest: None }
    }

    /// Takes `count` values for an array of `key` (clipped) declared at `offset`. When they do
    /// not fit, the error blames the key holding the most values: this one, or an earlier one.
    fn take(&mut self, key: &str, count: u64, offset: u64) -> Result<(), GgufError> {
        if count <= self.left {
            self.left -= count;
            self.current += count;
            return Ok(());
        }
        let mine = self.current.saturating_add(count);
        let (key, holds, next) = match &self.largest {
            Some((big, held)) if *held > mine => (big.clone(), *held, Some((key.to_owned(), count))),
            _ => (key.to_owned(), mine, None),
        };
        Err(GgufError::TooManyMetaValues { key, holds, limit: self.limit, offset, next })
    }

    /// Ends the entry of `key`.
    fn finish_key(&mut self, key: &str) {
        if self.current > self.largest.as_ref().map_or(0, |l| l.1) {
            self.largest = Some((key.to_owned(), self.current));
        }
        self.current = 0;
    }
}

/// A cursor over untrusted bytes; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn take(&mut self, n: usize, what: impl FnOnce() -> String) -> Result<&'a [u8], GgufError> {
        match self.pos.checked_add(n).and_then(|end| self.buf.get(self.pos..end)) {
            Some(slice) => {
                self.pos += n;
                Ok(slice)
            }
            None => Err(GgufError::Truncated { what: what(), offset: self.offset() }),
        }
    }

    fn array<const N: usize>(&mut self, what: impl FnOnce() -> String) -> Result<[u8; N], GgufError> {
        let slice = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A GGUF string: u64 length then UTF-8 bytes. The length is checked against the
    /// remaining bytes before anything is copied.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(|| format!("length of {}", what()))?;
        let start = self.offset();
        if len > self.remaining() as u64 {
            return Err(GgufError::Truncated {
                what: format!("{} ({len} bytes declared, {} left)", what(), self.remaining()),
                offset: start,
            });
        }
        let bytes = self.take(len as usize, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(GgufError::InvalidUtf8 { what: what(), offset: start }),
        }
    }

    /// One metadata value of type `ty` belonging to `key` (clipped for messages), at array
    /// nesting `depth`. `budget` counts the array elements still allowed in this file.
    fn value(&mut self, ty: u32, key: &str, depth: usize, budget: &mut MetaBudget) -> Result<MetaValue, GgufError> {
        use value_type::*;
        let what = || format!("value of metadata key {key:?}");
        Ok(match ty {
            U8 => MetaValue::U8(u8::from_le_bytes(self.array(what)?)),
            I8 => MetaValue::I8(i8::from_le_bytes(self.array(what)?)),
            U16 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            I16 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            U32 => MetaValue::U32(u32::from_le_bytes(self.array(what)?)),
            I32 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            F32 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            U64 => MetaValue::U64(u64::from_le_bytes(self.array(what)?)),
            I64 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            F64 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            BOOL => {
                let at = self.offset();
                match self.array::<1>(what)?[0] {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    byte => return Err(GgufError::InvalidBool { key: key.to_owned(), byte, offset: at }),
                }
            }
            STRING => MetaValue::String(self.string(&what)?),
            ARRAY => {
                let at = self.offset();
                if depth + 1 > MAX_ARRAY_DEPTH {
                    return Err(GgufError::ArrayTooDeep { key: key.to_owned(), offset: at });
                }
                let elem_ty = self.u32(|| format!("array element type of metadata key {key:?}"))?;
                let min = min_value_bytes(elem_ty).ok_or_else(|| GgufError::UnknownValueType {
                    key: key.to_owned(),
                    type_id: elem_ty,
                    offset: at,
                })?;
                let count_at = self.offset();
                let count = self.u64(|| format!("array length of metadata key {key:?}"))?;
                // An absurd count is reported as such, before comparing it with the file size.
                budget.take(key, count, count_at)?;
                let left = self.remaining() as u64;
                if count > left / min {
                    return Err(GgufError::Truncated {
                        what: format!(
                            "array of metadata key {key:?} ({count} elements of at least {min} bytes declared, {left} bytes left)"
                        ),
                        offset: self.offset(),
                    });
                }
                // `count` is at most the remaining byte count and within MAX_META_VALUES; the
                // vector still grows with the elements actually read.
                let mut items = Vec::with_capacity(count.min(PREALLOC_LIMIT) as usize);
                for _ in 0..count {
                    items.push(self.value(elem_ty, key, depth + 1, budget)?);
                }
                MetaValue::Array(items)
            }
            _ => {
                return Err(GgufError::UnknownValueType {
                    key: key.to_owned(),
                    type_id: ty,
                    offset: self.offset().saturating_sub(4),
                })
            }
        })
    }
}

fn align_up(x: u64, alignment: u64) -> Option<u64> {
    // `alignment` is a nonzero power of two.
    x.checked_add(alignment - 1).map(|v| v & !(alignment - 1))
}

impl GgufFile {
    /// Reads and parses the file at `path`, which must be a regular file: a directory, a
    /// device such as `/dev/zero` or a FIFO is refused before it is opened (reading it could
    /// block or never end). The file is read once, whole; tensors are slices of it.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io { path: path.to_owned(), source };
        let kind = |ft: std::fs::FileType| -> Option<&'static str> {
            if ft.is_file() {
                return None;
            }
            if ft.is_dir() {
                return Some("directory");
            }
            #[cfg(unix)]
            {
                use std::os::unix::fs::FileTypeExt;
                for (is, name) in [
                    (ft.is_fifo(), "fifo (named pipe)"),
                    (ft.is_char_device(), "character device"),
                    (ft.is_block_device(), "block device"),
                    (ft.is_socket(), "socket"),
                ] {
                    if is {
                        return Some(name);
                    }
                }
            }
            Some("special file")
        };
        let not_a_file = |kind| GgufError::NotAFile { path: path.to_owned(), kind };
        if let Some(k) = kind(std::fs::metadata(path).map_err(io)?.file_type()) {
            return Err(not_a_file(k));
        }
        let file = std::fs::File::open(path).map_err(io)?;
        // The path may have been replaced since it was checked; check what was opened.
        let meta = file.metadata().map_err(io)?;
        if let Some(k) = kind(meta.file_type()) {
            return Err(not_a_file(k));
        }
        let map = crate::source::files::map_file(&file, meta.len()).map_err(io)?;
        Self::parse_bytes(FileBytes::Mapped(map), MAX_META_VALUES)
    }

    /// Parses a whole GGUF file held in memory.
    pub fn parse(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse_with_limit(bytes, MAX_META_VALUES)
    }

    /// [`GgufFile::parse`] with `meta_values` in place of [`MAX_META_VALUES`] (for tests).
    fn parse_with_limit(bytes: Vec<u8>, meta_values: u64) -> Result<Self, GgufError> {
        Self::parse_bytes(FileBytes::Owned(bytes), meta_values)
    }

    fn parse_bytes(bytes: FileBytes, meta_values: u64) -> Result<Self, GgufError> {
        let file_len = bytes.len() as u64;
        let mut r = Reader { buf: &bytes, pos: 0 };

        let magic: [u8; 4] = r.array(|| "magic".to_owned())?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic { found: magic.to_vec() });
        }
        let version = r.u32(|| "version".to_owned())?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion { version });
        }
        let counts_at = r.offset();
        let tensor_count = r.u64(|| "tensor count".to_owned())?;
        let kv_count = r.u64(|| "metadata entry count".to_owned())?;
        // Absurd counts are reported as such, not as a truncated file.
        for (what, value, limit, offset) in [
            ("tensor count", tensor_count, MAX_TENSORS, counts_at),
            ("metadata entry count", kv_count, MAX_META_ENTRIES, counts_at + 8),
        ] {
            if value > limit {
                return Err(GgufError::TooLarge { what: what.to_owned(), value, limit, offset });
            }
        }
        let left = r.remaining() as u64;
        let needed = kv_count
            .checked_mul(MIN_KV_BYTES)
            .zip(tensor_count.checked_mul(MIN_TENSOR_INFO_BYTES))
            .and_then(|(a, b)| a.checked_add(b));
        if needed.is_none_or(|n| n > left) {
            return Err(GgufError::Truncated {
                what: format!("{kv_count} metadata entries and {tensor_count} tensor infos ({left} bytes left)"),
                offset: r.offset(),
            });
        }

        // Metadata.
        let mut metadata = Vec::with_capacity(kv_count.min(PREALLOC_LIMIT) as usize);
        let mut meta_index = HashMap::with_capacity(kv_count.min(PREALLOC_LIMIT) as usize);
        let mut budget = MetaBudget::new(meta_values);
        for i in 0..kv_count {
            let key_at = r.offset();
            let key = r.string(&|| format!("key of metadata entry {i}"))?;
            let label = clip(&key);
            if meta_index.contains_key(&key) {
                return Err(GgufError::DuplicateKey { key: label, offset: key_at });
            }
            let ty_at = r.offset();
            let ty = r.u32(|| format!("value type of metadata key {label:?}"))?;
            if min_value_bytes(ty).is_none() {
                return Err(GgufError::UnknownValueType { key: label, type_id: ty, offset: ty_at });
            }
            let value = r.value(ty, &label, 0, &mut budget)?;
            budget.finish_key(&label);
            meta_index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_integer() {
                Some(a) if a > 0 && a <= u64::MAX as i128 && (a as u64).is_power_of_two() => a as u64,
                _ => return Err(GgufError::BadAlignment { value: describe_value(v) }),
            },
        };

        // Tensor infos.
        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(tensor_count.min(PREALLOC_LIMIT) as usize);
        let mut tensor_index = HashMap::with_capacity(tensor_count.min(PREALLOC_LIMIT) as usize);
        for i in 0..tensor_count {
            let at = r.offset();
            let full_name = r.string(&|| format!("name of tensor info {i}"))?;
            // `name` is what messages show; the full name is kept in the info.
            let name = clip(&full_name);
            if tensor_index.contains_key(&full_name) {
                return Err(GgufError::DuplicateTensor { tensor: name, offset: at });
            }
            let n_dims = r.u32(|| format!("dimension count of tensor {name:?}"))?;
            if n_dims == 0 || n_dims as usize > MAX_DIMS {
                return Err(GgufError::InvalidDims {
                    tensor: name,
                    reason: format!("{n_dims} dimensions (allowed: 1 to {MAX_DIMS})"),
                    offset: at,
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for k in 0..n_dims {
                let d = r.u64(|| format!("dimension {k} of tensor {name:?}"))?;
                if d == 0 {
                    return Err(GgufError::InvalidDims {
                        tensor: name,
                        reason: format!("dimension {k} is zero"),
                        offset: at,
                    });
                }
                dims.push(d);
            }
            let type_id = r.u32(|| format!("type of tensor {name:?}"))?;
            let ggml_type = GgmlType::from_id(type_id)
                .ok_or_else(|| GgufError::UnknownTensorType { tensor: name.clone(), type_id })?;
            let offset = r.u64(|| format!("data offset of tensor {name:?}"))?;

            let n_elements = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let Some(n_elements) = n_elements else {
                return Err(GgufError::DimsOverflow { tensor: name, offset: at });
            };
            let block_values = ggml_type.block_values();
            if !dims[0].is_multiple_of(block_values as u64) {
                return Err(GgufError::NotBlockMultiple { tensor: name, ggml_type, dim0: dims[0], block_values });
            }
            let Some(n_bytes) = ggml_type.bytes_for(n_elements) else {
                return Err(GgufError::DimsOverflow { tensor: name, offset: at });
            };
            tensor_index.insert(full_name.clone(), tensors.len());
            tensors.push(TensorInfo { name: full_name, dims, ggml_type, offset, n_bytes });
        }

        // Data section and tensor ranges.
        let infos_end = r.offset();
        let data_start = if tensors.is_empty() {
            align_up(infos_end, alignment).unwrap_or(u64::MAX).min(file_len)
        } else {
            align_up(infos_end, alignment)
                .ok_or_else(|| GgufError::Truncated { what: "data section".to_owned(), offset: infos_end })?
        };
        for t in &tensors {
            if !t.offset.is_multiple_of(alignment) {
                return Err(GgufError::MisalignedTensor { tensor: clip(&t.name), offset: t.offset, alignment });
            }
            let start = data_start.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.n_bytes));
            match (start, end) {
                (Some(_), Some(end)) if end <= file_len => {}
                _ => {
                    return Err(GgufError::TensorOutOfBounds {
                        tensor: clip(&t.name),
                        start: start.unwrap_or(u64::MAX),
                        end: end.unwrap_or(u64::MAX),
                        file_len,
                    })
                }
            }
        }
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&i| (tensors[i].offset, i));
        for pair in order.windows(2) {
            let (a, b) = (&tensors[pair[0]], &tensors[pair[1]]);
            // Cannot overflow: both ranges were checked to lie inside the file.
            if a.offset + a.n_bytes > b.offset {
                return Err(GgufError::OverlappingTensors { first: clip(&a.name), second: clip(&b.name) });
            }
        }

        Ok(GgufFile { version, alignment, tensors, metadata, meta_index, tensor_index, bytes, data_start })
    }

    /// All metadata entries, in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &MetaValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The value of metadata key `key`, if present.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn require(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey { key: key.to_owned() })
    }

    fn wrong_type(key: &str, expected: &'static str, found: &MetaValue) -> GgufError {
        GgufError::WrongKeyType { key: key.to_owned(), expected, found: describe_value(found) }
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| Self::wrong_type(key, "a string", v))
    }

    /// An integer value of any integer type, if it fits in `u32`.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        let v = self.require(key)?;
        let i = v.as_integer().ok_or_else(|| Self::wrong_type(key, "an integer", v))?;
        u32::try_from(i).map_err(|_| GgufError::OutOfRange {
            key: key.to_owned(),
            expected: "u32",
            value: i.to_string(),
        })
    }

    /// An integer value of any integer type, if it fits in `u64`.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        let i = v.as_integer().ok_or_else(|| Self::wrong_type(key, "an integer", v))?;
        u64::try_from(i).map_err(|_| GgufError::OutOfRange {
            key: key.to_owned(),
            expected: "u64",
            value: i.to_string(),
        })
    }

    /// A float value (`f32`, or `f64` rounded to `f32`).
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        match self.require(key)? {
            MetaValue::F32(x) => Ok(*x),
            MetaValue::F64(x) => Ok(*x as f32),
            v => Err(Self::wrong_type(key, "a float", v)),
        }
    }

    /// A bool value.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.require(key)? {
            MetaValue::Bool(b) => Ok(*b),
            v => Err(Self::wrong_type(key, "a bool", v)),
        }
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let v = self.require(key)?;
        let items = v.as_array().ok_or_else(|| Self::wrong_type(key, "an array of strings", v))?;
        items.iter().map(|item| item.as_str().ok_or_else(|| Self::wrong_type(key, "an array of strings", v))).collect()
    }

    /// An array of integers that all fit in `i32` (any integer element type).
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        let v = self.require(key)?;
        let items = v.as_array().ok_or_else(|| Self::wrong_type(key, "an array of integers", v))?;
        items
            .iter()
            .map(|item| {
                let i = item.as_integer().ok_or_else(|| Self::wrong_type(key, "an array of integers", v))?;
                i32::try_from(i).map_err(|_| GgufError::OutOfRange {
                    key: key.to_owned(),
                    expected: "i32",
                    value: i.to_string(),
                })
            })
            .collect()
    }

    /// The info of tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensor_index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| GgufError::MissingTensor { name: name.to_owned() })
    }

    /// The raw bytes of a tensor of this file. Ranges were validated at parse time; an info
    /// that does not belong to this file yields an empty slice rather than a panic.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let range = self.data_start.checked_add(info.offset).and_then(|start| {
            let end = start.checked_add(info.n_bytes)?;
            Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
        });
        range.and_then(|r| self.bytes.get(r)).unwrap_or(&[])
    }

    /// Offset of the data section from the start of the file.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// Size of the whole file in bytes.
    pub fn file_len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Gives back the memory of `bytes`, a slice of this file (a tensor's data) that will not
    /// be read again soon: a mapped file's pages are dropped (a later read maps them back), a
    /// file read into memory keeps them. Anything that is not a part of this file is ignored.
    pub fn release(&self, bytes: &[u8]) {
        if let FileBytes::Mapped(m) = &self.bytes {
            m.release(bytes);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// Builds a GGUF v3 file: the one writer, used by `cargo xtask optimize` (through
/// [`crate::optimize`]) and by the tests' synthetic models.
///
/// Tensor data is laid out in insertion order, each tensor aligned to the file's alignment
/// (32, or `general.alignment` when it is set to a valid `u32`/`u64` power of two). The writer
/// does not validate shapes against data lengths: it writes what it is given.
#[derive(Clone, Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    /// Name, dims, type, and the data: held, or (`None`) given to [`GgufWriter::write_streaming`].
    tensors: Vec<(String, Vec<u64>, GgmlType, Option<Vec<u8>>, u64)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a metadata entry. Arrays must be homogeneous (the element type written is
    /// the first element's; an empty array is written as an array of `u8`).
    ///
    /// # Panics
    /// On a heterogeneous array, which GGUF cannot represent.
    pub fn add_meta(&mut self, key: &str, value: MetaValue) -> &mut Self {
        fn check(v: &MetaValue) {
            if let MetaValue::Array(items) = v {
                if let Some(first) = items.first() {
                    assert!(items.iter().all(|i| i.type_id() == first.type_id()), "gguf arrays must be homogeneous");
                }
                items.iter().for_each(check);
            }
        }
        check(&value);
        self.metadata.push((key.to_owned(), value));
        self
    }

    /// Sets `key` to `value`: replaces the value in place if the key is there, else appends.
    pub fn set_meta(&mut self, key: &str, value: MetaValue) -> &mut Self {
        match self.metadata.iter().position(|(k, _)| k == key) {
            Some(i) => {
                let mut one = GgufWriter::new();
                one.add_meta(key, value);
                self.metadata[i] = one.metadata.pop().expect("one entry");
                self
            }
            None => self.add_meta(key, value),
        }
    }

    /// Appends a tensor with its raw data.
    pub fn add_tensor(&mut self, name: &str, dims: &[u64], ggml_type: GgmlType, bytes: &[u8]) -> &mut Self {
        self.tensors.push((name.to_owned(), dims.to_vec(), ggml_type, Some(bytes.to_vec()), bytes.len() as u64));
        self
    }

    /// Appends a tensor of `len` bytes whose data the caller writes when the file is written
    /// ([`GgufWriter::write_streaming`]): a large model is written without a copy of it.
    pub fn add_tensor_streamed(&mut self, name: &str, dims: &[u64], ggml_type: GgmlType, len: u64) -> &mut Self {
        self.tensors.push((name.to_owned(), dims.to_vec(), ggml_type, None, len));
        self
    }

    fn alignment(&self) -> u64 {
        let set = self.metadata.iter().rev().find(|(k, _)| k == "general.alignment");
        match set.and_then(|(_, v)| v.as_integer()) {
            Some(a) if a > 0 && a <= u32::MAX as i128 && (a as u64).is_power_of_two() => a as u64,
            _ => DEFAULT_ALIGNMENT,
        }
    }

    /// The finished file.
    pub fn finish(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out).expect("writing to memory cannot fail");
        out
    }

    /// Writes the file to `out`: the header (magic, version 3, counts, metadata, tensor
    /// infos), padding to the alignment, then each tensor's data at its aligned offset, and
    /// padding at the end.
    pub fn write_to(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        self.write_streaming(out, &mut |i, _| {
            Err(std::io::Error::other(format!("tensor {i} was added streamed: use write_streaming")))
        })
    }

    /// [`GgufWriter::write_to`], asking `data(i, out)` to write the data of tensor `i` when it
    /// was added with [`GgufWriter::add_tensor_streamed`] (exactly the length given then,
    /// checked).
    pub fn write_streaming(
        &self,
        out: &mut impl std::io::Write,
        data: &mut dyn FnMut(usize, &mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let alignment = self.alignment();
        let mut header = Vec::new();
        header.extend_from_slice(&GGUF_MAGIC);
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut header, key);
            header.extend_from_slice(&value.type_id().to_le_bytes());
            write_value(&mut header, value);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for (name, dims, ty, _, len) in &self.tensors {
            write_string(&mut header, name);
            header.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&ty.id().to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = align_up(offset + len, alignment).unwrap_or(u64::MAX);
        }
        if self.tensors.is_empty() {
            return out.write_all(&header);
        }
        pad_to(&mut header, alignment);
        out.write_all(&header)?;
        let mut written = 0u64;
        let zeros = vec![0u8; alignment as usize];
        for (i, ((name, _, _, bytes, len), off)) in self.tensors.iter().zip(offsets).enumerate() {
            out.write_all(&zeros[..(off - written) as usize])?;
            match bytes {
                Some(bytes) => out.write_all(bytes)?,
                None => {
                    let mut counted = Counted { out: &mut *out, n: 0 };
                    data(i, &mut counted)?;
                    if counted.n != *len {
                        return Err(std::io::Error::other(format!(
                            "tensor {name:?}: {} bytes written for {len} announced",
                            counted.n
                        )));
                    }
                }
            }
            written = off + len;
        }
        let end = align_up(header.len() as u64 + written, alignment).unwrap_or(u64::MAX);
        out.write_all(&zeros[..(end - header.len() as u64 - written) as usize])
    }
}

/// A writer counting the bytes through it.
struct Counted<'a, W: std::io::Write> {
    out: &'a mut W,
    n: u64,
}

impl<W: std::io::Write> std::io::Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

fn pad_to(out: &mut Vec<u8>, alignment: u64) {
    let len = align_up(out.len() as u64, alignment).unwrap_or(u64::MAX) as usize;
    out.resize(len, 0);
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => write_string(out, s),
        MetaValue::Array(items) => {
            let elem_ty = items.first().map_or(value_type::U8, MetaValue::type_id);
            out.extend_from_slice(&elem_ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, item);
            }
        }
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kiln_format_has_the_geometry_of_its_ggml_type() {
        for format in QuantFormat::ALL {
            let t = GgmlType::from_id(format.ggml_type()).expect("a known ggml type");
            assert_eq!(t.quant_format(), Some(format));
            assert_eq!(
                (t.block_values(), t.block_bytes()),
                (format.block_values(), format.block_bytes()),
                "{format:?}"
            );
            assert!(t.name().eq_ignore_ascii_case(format.name()), "{format:?}");
        }
    }

    fn s(v: &str) -> MetaValue {
        MetaValue::String(v.to_owned())
    }

    /// A small file exercising every value type and three tensor types.
    fn sample_writer() -> GgufWriter {
        let mut w = GgufWriter::new();
        w.add_meta("general.architecture", s("llama"))
            .add_meta("test.u8", MetaValue::U8(200))
            .add_meta("test.i8", MetaValue::I8(-5))
            .add_meta("test.u16", MetaValue::U16(60000))
            .add_meta("test.i16", MetaValue::I16(-30000))
            .add_meta("llama.block_count", MetaValue::U32(30))
            .add_meta("test.i32", MetaValue::I32(-7))
            .add_meta("test.f32", MetaValue::F32(1e-5))
            .add_meta("test.bool", MetaValue::Bool(true))
            .add_meta("test.u64", MetaValue::U64(1 << 40))
            .add_meta("test.small_u64", MetaValue::U64(77))
            .add_meta("test.i64", MetaValue::I64(-1))
            .add_meta("test.f64", MetaValue::F64(100000.0))
            .add_meta("test.tokens", MetaValue::Array(vec![s("a"), s("é"), s("<|im_start|>")]))
            .add_meta("test.types", MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(3), MetaValue::I32(4)]))
            .add_meta(
                "test.nested",
                MetaValue::Array(vec![
                    MetaValue::Array(vec![MetaValue::U8(1), MetaValue::U8(2)]),
                    MetaValue::Array(vec![MetaValue::U8(3)]),
                ]),
            )
            .add_meta("test.empty", MetaValue::Array(vec![]));
        let f32_data: Vec<u8> = (0..8u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
        w.add_tensor("a.weight", &[4, 2], GgmlType::F32, &f32_data);
        let q41: Vec<u8> = (0..40u8).collect();
        w.add_tensor("b.weight", &[32, 2], GgmlType::Q4_1, &q41);
        let q80: Vec<u8> = (100..168u8).collect();
        w.add_tensor("c.weight", &[64], GgmlType::Q8_0, &q80);
        w
    }

    fn sample_bytes() -> Vec<u8> {
        sample_writer().finish()
    }

    /// Hand-assembles headers and tensor infos, including ones the writer cannot express.
    struct Raw(Vec<u8>);

    impl Raw {
        fn new(version: u32, n_tensors: u64, n_kv: u64) -> Self {
            let mut v = b"GGUF".to_vec();
            v.extend_from_slice(&version.to_le_bytes());
            v.extend_from_slice(&n_tensors.to_le_bytes());
            v.extend_from_slice(&n_kv.to_le_bytes());
            Raw(v)
        }
        fn u32(mut self, x: u32) -> Self {
            self.0.extend_from_slice(&x.to_le_bytes());
            self
        }
        fn u64(mut self, x: u64) -> Self {
            self.0.extend_from_slice(&x.to_le_bytes());
            self
        }
        fn bytes(mut self, b: &[u8]) -> Self {
            self.0.extend_from_slice(b);
            self
        }
        fn str(self, x: &str) -> Self {
            self.u64(x.len() as u64).bytes(x.as_bytes())
        }
        fn tensor(self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> Self {
            let mut r = self.str(name).u32(dims.len() as u32);
            for &d in dims {
                r = r.u64(d);
            }
            r.u32(type_id).u64(offset)
        }
        /// Pads to 32 and appends `n` data bytes.
        fn data(mut self, n: usize) -> Vec<u8> {
            let len = self.0.len().div_ceil(32) * 32;
            self.0.resize(len + n, 0xab);
            self.0
        }
    }

    fn err(bytes: Vec<u8>) -> GgufError {
        match GgufFile::parse(bytes) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    #[test]
    fn ggml_type_table_is_consistent() {
        for (i, t) in GgmlType::ALL.iter().enumerate() {
            assert_eq!(GGML_TYPES[i].0, *t);
            assert_eq!(GgmlType::from_id(t.id()), Some(*t));
            assert!(t.block_values() > 0 && t.block_bytes() > 0);
            if let Some(q) = t.quant_format() {
                assert_eq!(q.block_values(), t.block_values(), "{t}");
                assert_eq!(q.block_bytes(), t.block_bytes(), "{t}");
                // kiln's names are ggml's in lowercase (`q4_k` for `q4_K`).
                assert!(q.name().eq_ignore_ascii_case(t.name()), "{t}");
            }
        }
        for retired in [4, 5, 31, 32, 33, 36, 37, 38, 1000, u32::MAX] {
            assert_eq!(GgmlType::from_id(retired), None);
        }
        assert_eq!(GgmlType::Q3_K.block_bytes(), 110);
        assert_eq!(GgmlType::Q8_0.id(), 8);
    }

    #[test]
    fn round_trip() {
        let bytes = sample_bytes();
        let f = GgufFile::parse(bytes.clone()).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.alignment, 32);
        assert_eq!(f.data_start() % 32, 0);
        assert_eq!(f.file_len(), bytes.len() as u64);

        let w = sample_writer();
        let got: Vec<(String, MetaValue)> = f.metadata().map(|(k, v)| (k.to_owned(), v.clone())).collect();
        assert_eq!(got, w.metadata);

        assert_eq!(f.tensors.len(), 3);
        for (info, (name, dims, ty, data, _)) in f.tensors.iter().zip(&w.tensors) {
            let data = data.as_ref().expect("held");
            assert_eq!(&info.name, name);
            assert_eq!(&info.dims, dims);
            assert_eq!(info.ggml_type, *ty);
            assert_eq!(info.offset % 32, 0);
            assert_eq!(info.n_bytes, data.len() as u64);
            assert_eq!(f.tensor_data(info), &data[..]);
            assert_eq!(f.tensor(name).unwrap(), info);
        }
        // The same tensors streamed give the same file; a wrong length is an error.
        let mut streamed = GgufWriter::new();
        streamed.metadata = w.metadata.clone();
        for (name, dims, ty, _, len) in &w.tensors {
            streamed.add_tensor_streamed(name, dims, *ty, *len);
        }
        let data = |i: usize| w.tensors[i].3.clone().expect("held");
        let mut out = vec![];
        streamed.write_streaming(&mut out, &mut |i, o| o.write_all(&data(i))).unwrap();
        assert_eq!(out, bytes);
        let short = streamed.write_streaming(&mut vec![], &mut |i, o| o.write_all(&data(i)[1..]));
        assert!(short.unwrap_err().to_string().contains("announced"));
        assert!(streamed.write_to(&mut vec![]).is_err(), "streamed tensors need write_streaming");
        assert_eq!(f.tensor("b.weight").unwrap().n_elements(), 64);

        // Typed getters.
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
        assert_eq!(f.get_u32("test.u8").unwrap(), 200);
        assert_eq!(f.get_u32("test.u16").unwrap(), 60000);
        assert_eq!(f.get_u32("test.small_u64").unwrap(), 77);
        assert_eq!(f.get_u64("test.u64").unwrap(), 1 << 40);
        assert_eq!(f.get_f32("test.f32").unwrap(), 1e-5);
        assert_eq!(f.get_f32("test.f64").unwrap(), 100000.0);
        assert!(f.get_bool("test.bool").unwrap());
        assert_eq!(f.get_str_array("test.tokens").unwrap(), ["a", "é", "<|im_start|>"]);
        assert_eq!(f.get_i32_array("test.types").unwrap(), [1, 3, 4]);
        assert_eq!(f.get_i32_array("test.empty").unwrap(), Vec::<i32>::new());
        assert_eq!(f.get("test.i8"), Some(&MetaValue::I8(-5)));
        assert_eq!(f.get("nope"), None);

        // Lookup errors name the key.
        let e = f.get_str("nope").unwrap_err();
        assert!(matches!(&e, GgufError::MissingKey { key } if key == "nope"), "{e}");
        assert!(e.to_string().contains("nope"));
        let e = f.get_u32("general.architecture").unwrap_err();
        assert!(matches!(&e, GgufError::WrongKeyType { key, .. } if key == "general.architecture"));
        assert!(e.to_string().contains("general.architecture"), "{e}");
        assert!(matches!(f.get_u32("test.i32"), Err(GgufError::OutOfRange { .. })));
        assert!(matches!(f.get_u32("test.u64"), Err(GgufError::OutOfRange { .. })));
        assert!(matches!(f.get_f32("test.u8"), Err(GgufError::WrongKeyType { .. })));
        assert!(matches!(f.get_bool("test.u8"), Err(GgufError::WrongKeyType { .. })));
        assert!(matches!(f.get_str_array("test.types"), Err(GgufError::WrongKeyType { .. })));
        assert!(matches!(f.get_i32_array("test.tokens"), Err(GgufError::WrongKeyType { .. })));
        let e = f.tensor("missing.weight").unwrap_err();
        assert!(matches!(&e, GgufError::MissingTensor { name } if name == "missing.weight"));

        // Writing the parsed content again gives identical bytes.
        let mut w2 = GgufWriter::new();
        for (k, v) in f.metadata() {
            w2.add_meta(k, v.clone());
        }
        for t in &f.tensors {
            w2.add_tensor(&t.name, &t.dims, t.ggml_type, f.tensor_data(t));
        }
        assert_eq!(w2.finish(), bytes);
    }

    #[test]
    fn version_2_and_custom_alignment() {
        let mut bytes = sample_bytes();
        bytes[4] = 2;
        assert_eq!(GgufFile::parse(bytes).unwrap().version, 2);

        let mut w = GgufWriter::new();
        w.add_meta("general.alignment", MetaValue::U32(64));
        w.add_tensor("x", &[3], GgmlType::F32, &[0; 12]);
        w.add_tensor("y", &[1], GgmlType::F32, &[1, 2, 3, 4]);
        let f = GgufFile::parse(w.finish()).unwrap();
        assert_eq!(f.alignment, 64);
        assert_eq!(f.data_start() % 64, 0);
        assert_eq!(f.tensor("y").unwrap().offset, 64);
        assert_eq!(f.tensor_data(f.tensor("y").unwrap()), &[1, 2, 3, 4]);
    }

    #[test]
    fn empty_file_without_tensors() {
        let f = GgufFile::parse(GgufWriter::new().finish()).unwrap();
        assert_eq!(f.tensors.len(), 0);
        assert_eq!(f.metadata().count(), 0);
    }

    #[test]
    fn truncation_at_every_offset() {
        let bytes = sample_bytes();
        let f = GgufFile::parse(bytes.clone()).unwrap();
        let data_start = f.data_start() as usize;
        let data_end = f.tensors.iter().map(|t| t.offset + t.n_bytes).max().unwrap() as usize;
        let data_end = data_start + data_end;
        assert!(data_end < bytes.len(), "the writer pads the file end");
        // Cutting the trailing padding after the last tensor leaves a valid file.
        for n in data_end..bytes.len() {
            assert!(GgufFile::parse(bytes[..n].to_vec()).is_ok(), "prefix of {n} bytes");
        }
        for n in 0..data_end {
            match GgufFile::parse(bytes[..n].to_vec()) {
                Ok(_) => panic!("prefix of {n} bytes parsed"),
                Err(GgufError::Truncated { offset, .. }) => {
                    assert!(offset <= n as u64, "offset {offset} past end {n}")
                }
                Err(GgufError::TensorOutOfBounds { .. }) if n >= data_start - 31 => {}
                Err(e) => panic!("prefix of {n} bytes: unexpected error {e}"),
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = ir::rng::SplitMix64::new(0x9e37_79b9_7f4a_7c15);
        let valid = sample_bytes();
        for round in 0..3000 {
            let bytes: Vec<u8> = match round % 3 {
                // Pure noise.
                0 => (0..rng.below(300)).map(|_| rng.next_u64() as u8).collect(),
                // A valid header followed by noise.
                1 => {
                    let mut b = valid[..24].to_vec();
                    b.extend((0..rng.below(400)).map(|_| rng.next_u64() as u8));
                    b
                }
                // A valid file with a few bytes corrupted (often small, plausible values).
                _ => {
                    let mut b = valid.clone();
                    for _ in 0..1 + rng.below(4) {
                        let at = rng.below(b.len() as u64) as usize;
                        b[at] = match rng.below(3) {
                            0 => rng.next_u64() as u8,
                            1 => 0xff,
                            _ => rng.below(16) as u8,
                        };
                    }
                    b
                }
            };
            if let Ok(f) = GgufFile::parse(bytes) {
                for t in &f.tensors {
                    assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes);
                }
            }
        }
    }

    #[test]
    fn bad_magic_and_version() {
        let mut bytes = sample_bytes();
        bytes[0] = b'X';
        let e = err(bytes);
        assert!(matches!(e, GgufError::BadMagic { .. }), "{e}");
        assert!(matches!(err(b"GGML".to_vec()), GgufError::BadMagic { .. }));
        assert!(matches!(err(b"GG".to_vec()), GgufError::Truncated { .. }));

        let e = err(Raw::new(1, 0, 0).0);
        assert!(matches!(e, GgufError::UnsupportedVersion { version: 1 }), "{e}");
        let e = err(Raw::new(3 << 24, 0, 0).0);
        assert!(matches!(e, GgufError::UnsupportedVersion { .. }), "{e}");
    }

    #[test]
    fn huge_string_length() {
        let e = err(Raw::new(3, 0, 1).u64(u64::MAX).bytes(&[b'k'; 64]).0);
        assert!(matches!(e, GgufError::Truncated { offset: 32, .. }), "{e}");
        let e = err(Raw::new(3, 0, 1).str("k").u32(8).u64(1 << 62).bytes(&[0; 64]).0);
        assert!(matches!(&e, GgufError::Truncated { what, .. } if what.contains("\"k\"")), "{e}");
        let e = err(Raw::new(3, 1, 0).u64(u64::MAX - 3).bytes(&[0; 64]).0);
        assert!(matches!(&e, GgufError::Truncated { what, .. } if what.contains("tensor")), "{e}");
    }

    #[test]
    fn huge_counts() {
        // An absurd array count is reported as too many values, not as a truncated file.
        let e = err(Raw::new(3, 0, 1).str("tokenizer.ggml.tokens").u32(9).u32(8).u64(u64::MAX).0);
        assert!(
            matches!(&e, GgufError::TooManyMetaValues { key, holds: u64::MAX, next: None, .. } if key == "tokenizer.ggml.tokens"),
            "{e}"
        );
        let e = err(Raw::new(3, 0, 1).str("a").u32(9).u32(4).u64(1 << 60).bytes(&[0; 100]).0);
        assert!(matches!(e, GgufError::TooManyMetaValues { holds: 0x1000_0000_0000_0000, .. }), "{e}");
        assert!(e.to_string().contains("1152921504606846976") && e.to_string().contains("\"a\""), "{e}");
        // A plausible array count beyond the file is a truncation.
        let e = err(Raw::new(3, 0, 1).str("a").u32(9).u32(4).u64(1000).bytes(&[0; 100]).0);
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
        // Absurd entry counts are too large, with the count in the message.
        for (raw, what) in [
            (Raw::new(3, 0, u64::MAX), "metadata entry count"),
            (Raw::new(3, u64::MAX, 0), "tensor count"),
            (Raw::new(3, 1 << 60, 0), "tensor count"),
            (Raw::new(3, 0, 1 << 60), "metadata entry count"),
        ] {
            let e = err(raw.0);
            assert!(matches!(&e, GgufError::TooLarge { what: w, .. } if w == what), "{e}");
            assert!(!e.to_string().contains("truncated"), "{e}");
        }
        let e = err(Raw::new(3, 1 << 60, 0).0);
        assert!(e.to_string().contains("1152921504606846976"), "{e}");
        // Plausible counts beyond the file are a truncation.
        assert!(matches!(err(Raw::new(3, 1000, 0).0), GgufError::Truncated { .. }));
        assert!(matches!(err(Raw::new(3, 0, 1000).0), GgufError::Truncated { .. }));
    }

    #[test]
    fn metadata_value_budget() {
        // An array of 10 u32 values against budgets of 9 and 10.
        let bytes = [4u32.to_le_bytes().as_slice(), &10u64.to_le_bytes(), &[0; 40]].concat();
        let mut r = Reader { buf: &bytes, pos: 0 };
        let mut budget = MetaBudget::new(9);
        let e = r.value(value_type::ARRAY, "k", 0, &mut budget).unwrap_err();
        assert!(matches!(e, GgufError::TooManyMetaValues { holds: 10, limit: 9, next: None, .. }), "{e}");
        let mut r = Reader { buf: &bytes, pos: 0 };
        let mut budget = MetaBudget::new(10);
        assert!(r.value(value_type::ARRAY, "k", 0, &mut budget).is_ok());
        assert_eq!(budget.left, 0);
    }

    #[test]
    fn exhausted_value_budget_blames_the_key_that_used_it() {
        let mut w = GgufWriter::new();
        w.add_meta("big.array", MetaValue::Array(vec![MetaValue::U8(0); 100]));
        w.add_meta("small.array", MetaValue::Array(vec![MetaValue::U8(0); 5]));
        let e = GgufFile::parse_with_limit(w.finish(), 100).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(&e, GgufError::TooManyMetaValues { key, holds: 100, limit: 100, next: Some((next, 5)), .. }
                if key == "big.array" && next == "small.array"),
            "{msg}"
        );
        assert!(msg.contains("\"big.array\" holds 100 array values") && msg.contains("limit of 100"), "{msg}");
        // A key that alone goes over the limit is blamed itself, with its total.
        let mut w = GgufWriter::new();
        w.add_meta("small.array", MetaValue::Array(vec![MetaValue::U8(0); 5]));
        w.add_meta(
            "nested",
            MetaValue::Array(vec![
                MetaValue::Array(vec![MetaValue::U8(0); 60]),
                MetaValue::Array(vec![MetaValue::U8(0); 60]),
            ]),
        );
        let e = GgufFile::parse_with_limit(w.finish(), 100).unwrap_err();
        assert!(
            matches!(&e, GgufError::TooManyMetaValues { key, holds: 122, next: None, .. } if key == "nested"),
            "{e}"
        );
    }

    #[test]
    fn huge_keys_and_names_are_clipped_in_messages() {
        let long = "k".repeat(1 << 20);
        let cases = [
            // Duplicate key, unknown value type, truncated value, invalid bool.
            {
                let mut w = GgufWriter::new();
                w.add_meta(&long, MetaValue::U8(1)).add_meta(&long, MetaValue::U8(2));
                w.finish()
            },
            Raw::new(3, 0, 1).str(&long).u32(13).bytes(&[0; 16]).0,
            Raw::new(3, 0, 1).str(&long).u32(4).0,
            Raw::new(3, 0, 1).str(&long).u32(7).bytes(&[9]).0,
            Raw::new(3, 0, 1).str(&long).u32(9).u32(4).u64(1000).bytes(&[0; 16]).0,
            // Tensor names: unknown type, out of bounds, duplicate.
            Raw::new(3, 1, 0).tensor(&long, &[32], 4, 0).data(64),
            Raw::new(3, 1, 0).tensor(&long, &[1024], 0, 0).data(64),
            Raw::new(3, 2, 0).tensor(&long, &[8], 0, 0).tensor(&long, &[8], 0, 32).data(64),
        ];
        for bytes in cases {
            let msg = err(bytes).to_string();
            assert!(msg.len() < 400, "{} bytes: {}", msg.len(), &msg[..400]);
            assert!(msg.contains("(1048576 bytes)"), "{msg}");
        }
        // A long string value in a lookup error.
        let mut w = GgufWriter::new();
        w.add_meta("general.alignment", s(&long));
        let msg = err(w.finish()).to_string();
        assert!(msg.len() < 400 && msg.contains("(1048576 bytes)") && msg.contains("string"), "{msg}");
        assert_eq!(clip("short"), "short");
        assert_eq!(clip(&"é".repeat(40)), format!("{}... (80 bytes)", "é".repeat(32)));
    }

    #[test]
    fn wrong_typed_values_are_reported_with_value_and_type() {
        let mut w = GgufWriter::new();
        w.add_meta("a.string", s("abc")).add_meta("a.u32", MetaValue::U32(7)).add_meta("a.i32", MetaValue::I32(-3));
        let f = GgufFile::parse(w.finish()).unwrap();
        let msg = f.get_u32("a.string").unwrap_err().to_string();
        assert!(msg.contains("\"a.string\"") && msg.contains("\"abc\" (string)"), "{msg}");
        let msg = f.get_str("a.u32").unwrap_err().to_string();
        assert!(msg.contains("7 (u32)"), "{msg}");
        let msg = f.get_u32("a.i32").unwrap_err().to_string();
        assert!(msg.contains("-3"), "{msg}");
        assert_eq!(describe_value(&MetaValue::Array(vec![s("x"), s("y")])), "an array of 2 string");
    }

    #[test]
    fn special_files_are_refused_before_reading() {
        let start = std::time::Instant::now();
        let dir = std::env::temp_dir().join(format!("kiln-gguf-special-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo.gguf");
        let status = std::process::Command::new("mkfifo").arg(&fifo).status().expect("run mkfifo");
        assert!(status.success());
        for (path, kind) in
            [(Path::new("/dev/zero"), "character device"), (fifo.as_path(), "fifo"), (dir.as_path(), "directory")]
        {
            let e = GgufFile::open(path).unwrap_err();
            assert!(matches!(e, GgufError::NotAFile { .. }), "{e}");
            let msg = e.to_string();
            assert!(msg.contains(kind) && msg.contains("not a regular file"), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        // A regular file still opens.
        let file = std::env::temp_dir().join(format!("kiln-gguf-regular-{}.gguf", std::process::id()));
        std::fs::write(&file, sample_bytes()).unwrap();
        assert_eq!(GgufFile::open(&file).unwrap().tensors.len(), 3);
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn unknown_value_type() {
        let e = err(Raw::new(3, 0, 1).str("my.key").u32(13).bytes(&[0; 16]).0);
        assert!(matches!(&e, GgufError::UnknownValueType { key, type_id: 13, offset: 38 } if key == "my.key"), "{e}");
        assert!(e.to_string().contains("my.key"));
        // Unknown array element type.
        let e = err(Raw::new(3, 0, 1).str("arr").u32(9).u32(99).u64(1).bytes(&[0; 16]).0);
        assert!(matches!(&e, GgufError::UnknownValueType { key, type_id: 99, .. } if key == "arr"));
    }

    #[test]
    fn nested_arrays_are_bounded() {
        let mut raw = Raw::new(3, 0, 1).str("deep").u32(9);
        for _ in 0..MAX_ARRAY_DEPTH + 2 {
            raw = raw.u32(9).u64(1);
        }
        let e = err(raw.bytes(&[0; 64]).0);
        assert!(matches!(&e, GgufError::ArrayTooDeep { key, .. } if key == "deep"), "{e}");
        // Depth MAX_ARRAY_DEPTH itself is accepted.
        let mut v = MetaValue::U8(7);
        for _ in 0..MAX_ARRAY_DEPTH {
            v = MetaValue::Array(vec![v]);
        }
        let mut w = GgufWriter::new();
        w.add_meta("ok", v.clone());
        assert_eq!(GgufFile::parse(w.finish()).unwrap().get("ok"), Some(&v));
    }

    #[test]
    fn invalid_utf8_and_bool() {
        let e = err(Raw::new(3, 0, 1).str("k").u32(8).u64(2).bytes(&[0xc3, 0x28]).0);
        assert!(matches!(&e, GgufError::InvalidUtf8 { what, .. } if what.contains("\"k\"")), "{e}");
        let e = err(Raw::new(3, 0, 1).u64(1).bytes(&[0xff]).u32(0).bytes(&[0]).0);
        assert!(matches!(e, GgufError::InvalidUtf8 { offset: 32, .. }), "{e}");
        let e = err(Raw::new(3, 0, 1).str("b").u32(7).bytes(&[2]).0);
        assert!(matches!(e, GgufError::InvalidBool { byte: 2, .. }), "{e}");
    }

    #[test]
    fn duplicates_are_rejected() {
        let mut w = GgufWriter::new();
        w.add_meta("a", MetaValue::U8(1)).add_meta("a", MetaValue::U8(2));
        let e = err(w.finish());
        assert!(matches!(&e, GgufError::DuplicateKey { key, .. } if key == "a"), "{e}");

        let mut w = GgufWriter::new();
        w.add_tensor("t", &[1], GgmlType::F32, &[0; 4]).add_tensor("t", &[1], GgmlType::F32, &[0; 4]);
        let e = err(w.finish());
        assert!(matches!(&e, GgufError::DuplicateTensor { tensor, .. } if tensor == "t"), "{e}");
    }

    #[test]
    fn bad_alignment() {
        for bad in [MetaValue::U32(0), MetaValue::U32(3), MetaValue::I32(-32), s("32")] {
            let mut w = GgufWriter::new();
            w.add_meta("general.alignment", bad);
            let e = err(w.finish());
            assert!(matches!(e, GgufError::BadAlignment { .. }), "{e}");
            assert!(e.to_string().contains("general.alignment"));
        }
    }

    #[test]
    fn unknown_tensor_type() {
        let e = err(Raw::new(3, 1, 0).tensor("w", &[32], 4, 0).data(64));
        assert!(matches!(&e, GgufError::UnknownTensorType { tensor, type_id: 4 } if tensor == "w"), "{e}");
        let e = err(Raw::new(3, 1, 0).tensor("w", &[32], 9999, 0).data(64));
        assert!(matches!(e, GgufError::UnknownTensorType { type_id: 9999, .. }), "{e}");
    }

    #[test]
    fn bad_dims() {
        let e = err(Raw::new(3, 1, 0).tensor("w", &[1 << 33, 1 << 33], 0, 0).data(64));
        assert!(matches!(&e, GgufError::DimsOverflow { tensor, .. } if tensor == "w"), "{e}");
        // Elements fit, bytes overflow.
        let e = err(Raw::new(3, 1, 0).tensor("w", &[1 << 31, 1 << 31], 0, 0).data(64));
        assert!(matches!(e, GgufError::DimsOverflow { .. }), "{e}");
        let e = err(Raw::new(3, 1, 0).tensor("w", &[u64::MAX, 2, 2, 2], 0, 0).data(64));
        assert!(matches!(e, GgufError::DimsOverflow { .. }), "{e}");
        let e = err(Raw::new(3, 1, 0).tensor("w", &[4, 0], 0, 0).data(64));
        assert!(matches!(e, GgufError::InvalidDims { .. }), "{e}");
        let e = err(Raw::new(3, 1, 0).tensor("w", &[1, 1, 1, 1, 1], 0, 0).data(64));
        assert!(matches!(e, GgufError::InvalidDims { .. }), "{e}");
        let e = err(Raw::new(3, 1, 0).tensor("w", &[], 0, 0).data(64));
        assert!(matches!(e, GgufError::InvalidDims { .. }), "{e}");
        let e = err(Raw::new(3, 1, 0).u64(1).bytes(b"w").u32(u32::MAX).data(64));
        assert!(matches!(e, GgufError::InvalidDims { .. }), "{e}");
        // Q4_0 rows must be whole blocks of 32.
        let e = err(Raw::new(3, 1, 0).tensor("w", &[48, 2], 2, 0).data(64));
        assert!(matches!(e, GgufError::NotBlockMultiple { dim0: 48, block_values: 32, .. }), "{e}");
    }

    #[test]
    fn misaligned_offset() {
        let e = err(Raw::new(3, 1, 0).tensor("w", &[2], 0, 4).data(64));
        assert!(matches!(&e, GgufError::MisalignedTensor { tensor, offset: 4, alignment: 32 } if tensor == "w"), "{e}");
    }

    #[test]
    fn out_of_bounds_tensor() {
        let e = err(Raw::new(3, 1, 0).tensor("w", &[1024], 0, 0).data(64));
        assert!(matches!(&e, GgufError::TensorOutOfBounds { tensor, .. } if tensor == "w"), "{e}");
        let e = err(Raw::new(3, 1, 0).tensor("w", &[1], 0, 1 << 63).data(64));
        assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");
        let e = err(Raw::new(3, 1, 0).tensor("w", &[1], 0, u64::MAX - 31).data(64));
        assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");
        // Exactly fitting data is fine.
        assert!(GgufFile::parse(Raw::new(3, 1, 0).tensor("w", &[16], 0, 0).data(64)).is_ok());
    }

    #[test]
    fn overlapping_tensors() {
        let raw = Raw::new(3, 2, 0).tensor("a", &[16], 0, 0).tensor("b", &[8], 0, 32);
        let e = err(raw.data(128));
        assert!(matches!(e, GgufError::OverlappingTensors { .. }), "{e}");
        let raw = Raw::new(3, 2, 0).tensor("a", &[8], 0, 0).tensor("b", &[8], 0, 0);
        assert!(matches!(err(raw.data(128)), GgufError::OverlappingTensors { .. }));
    }

    #[test]
    fn foreign_tensor_info_does_not_panic() {
        let f = GgufFile::parse(sample_bytes()).unwrap();
        let mut info = f.tensors[0].clone();
        info.offset = u64::MAX;
        assert!(f.tensor_data(&info).is_empty());
        info.offset = 0;
        info.n_bytes = 1 << 40;
        assert!(f.tensor_data(&info).is_empty());
    }

    #[test]
    fn error_messages_are_lowercase() {
        let errors =
            [err(Raw::new(1, 0, 0).0), err(b"GG".to_vec()), err(Raw::new(3, 1, 0).tensor("w", &[32], 4, 0).data(64))];
        for e in errors {
            let msg = e.to_string();
            assert!(msg.starts_with(|c: char| !c.is_uppercase()), "{msg}");
        }
    }

    /// Opens the real SmolLM2 model named by `KILN_MODEL` (`cargo xtask test` sets it; unset, the test fails).
    #[test]
    fn real_model() {
        let path = std::env::var("KILN_MODEL")
            .expect("KILN_MODEL is not set: point it at the test model's GGUF (`cargo xtask test` sets it)");
        let f = GgufFile::open(Path::new(&path)).unwrap();
        assert_eq!(f.tensors.len(), 272);
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
        let emb = f.tensor("token_embd.weight").unwrap();
        assert_eq!(emb.ggml_type, GgmlType::Q8_0);
        assert_eq!(emb.dims, [576, 49152]);
        assert_eq!(f.tensor_data(emb).len(), 49152 * 576 / 32 * 34);
        let count = |t: GgmlType| f.tensors.iter().filter(|i| i.ggml_type == t).count();
        assert_eq!((count(GgmlType::Q4_1), count(GgmlType::F32), count(GgmlType::Q8_0)), (210, 61, 1));
        assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
        assert_eq!(f.get_str_array("tokenizer.ggml.tokens").unwrap().len(), 49152);
        // The 17 special tokens (<|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ...)
        // are CONTROL (3); every other token is NORMAL (1).
        let types = f.get_i32_array("tokenizer.ggml.token_type").unwrap();
        assert!(types[..17].iter().all(|&t| t == 3));
        assert!(types[17..].iter().all(|&t| t == 1));
        assert_eq!(f.get_str_array("tokenizer.ggml.merges").unwrap().len(), 48900);
        assert_eq!(f.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
        assert_eq!(f.get_u32("tokenizer.ggml.bos_token_id").unwrap(), 1);
        assert_eq!(f.get_u32("tokenizer.ggml.eos_token_id").unwrap(), 2);
        assert!(!f.get_bool("tokenizer.ggml.add_bos_token").unwrap());
        assert!(f.get_str("tokenizer.chat_template").unwrap().contains("<|im_start|>"));
        assert_eq!(f.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
        assert_eq!(f.get_u32("llama.embedding_length").unwrap(), 576);
        assert_eq!(f.alignment, 32);
        assert_eq!(f.file_len(), 98_362_432);
    }
}
