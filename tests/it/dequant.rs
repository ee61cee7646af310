//! kiln's weight formats against an independent implementation: gguf-py, the GGUF library
//! of the llama.cpp project (`gguf.quants`, numpy), run by `tests/peer/gguf_quants.py`.
//!
//! The burn reference executor reads weights with kiln's own GGUF reader and dequantizer, so
//! a mistake there would be invisible to the model tests; these tests close that loop:
//! - every format's dequantization (`ir::quant::dequantize`) equals gguf-py's bit for bit, on
//!   blocks that take every f16 bit pattern as the scale (subnormal, negative, zero, inf,
//!   NaN), every nibble and byte value, and Q4_1 minimums of every kind;
//! - `ir::quant::quantize_row` produces the same bytes as `gguf.quants.quantize`;
//! - every tensor of the real model (`KILN_MODEL`), read by gguf-py's own `GGUFReader` and
//!   by `compiler::gguf`, dequantizes to the same bits.
//!
//! One difference is allowed, and counted: numpy's f16 to f32 cast keeps a signaling NaN
//! signaling, while the hardware conversion (F16C, which ggml itself and the `half` crate use)
//! sets the quiet bit. Two NaNs therefore compare equal when they differ only in that bit
//! (sign and payload must match). No real model holds NaN weights.
//!
//! The tests fail, never skip, when Python or gguf-py is missing; `cargo xtask test` installs
//! the pinned version (`peers::GGUF_PY`). `KILN_PYTHON` may name the interpreter.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use compiler::gguf::GgufFile;
use ir::quant::{dequantize, quantize_row, BLOCK_SIZE};
use ir::QuantFormat;
use tests::harness::{peer_script, python, run_gguf_py, scratch_dir, Rng};

const QUIET_BIT: u32 = 0x0040_0000;

/// Whether kiln's value `a` equals gguf-py's `b` bit for bit (NaNs up to the quiet bit).
fn same_bits(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan() && a.to_bits() | QUIET_BIT == b.to_bits() | QUIET_BIT)
}

/// Compares two dequantizations value by value; panics naming the first mismatches.
/// Returns how many NaNs matched only up to the quiet bit.
fn compare(what: &str, kiln: &[f32], peer: &[f32], block_values: usize, raw: &[u8], block_bytes: usize) -> usize {
    assert_eq!(kiln.len(), peer.len(), "{what}: kiln has {} values, gguf-py {}", kiln.len(), peer.len());
    let mut quiet_only = 0;
    let mut bad = vec![];
    for (i, (&a, &b)) in kiln.iter().zip(peer).enumerate() {
        if a.to_bits() != b.to_bits() {
            if same_bits(a, b) {
                quiet_only += 1;
            } else {
                bad.push(i);
            }
        }
    }
    for &i in bad.iter().take(8) {
        let blk = i / block_values;
        let bytes = raw.get(blk * block_bytes..(blk + 1) * block_bytes).unwrap_or(&[]);
        eprintln!(
            "{what}: value {i} (block {blk}, bytes {bytes:02x?}): kiln {} ({:#010x}), gguf-py {} ({:#010x})",
            kiln[i],
            kiln[i].to_bits(),
            peer[i],
            peer[i].to_bits()
        );
    }
    assert!(bad.is_empty(), "{what}: {} of {} values differ from gguf-py (first ones above)", bad.len(), kiln.len());
    quiet_only
}

fn read_npy_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
    npy.into_vec::<f32>().unwrap_or_else(|e| panic!("reading float32 data of {}: {e}", path.display()))
}

fn f16_bytes(bits: u16) -> [u8; 2] {
    bits.to_le_bytes()
}

/// `x` rounded to f16 (kiln's F16 quantizer), as little-endian bytes.
fn f16_of(x: f32) -> Vec<u8> {
    quantize_row(QuantFormat::F16, &[x])
}

/// f16 bit patterns that matter: zeros, subnormals, normals, the largest, infinities, NaNs.
const SPECIAL_F16: &[u16] = &[
    0x0000, 0x8000, 0x0001, 0x8001, 0x03ff, 0x83ff, 0x0400, 0x8400, 0x3c00, 0xbc00, 0x7bff, 0xfbff, 0x7c00, 0xfc00,
    0x7e00, 0xfe00, 0x7c01, 0x7d55, 0xfc01,
];

/// Raw blocks of `format` covering the edge cases (see the module docs), then random ones.
fn test_blocks(format: QuantFormat, rng: &mut Rng) -> Vec<u8> {
    let mut out = vec![];
    match format {
        // Every f16 bit pattern once.
        QuantFormat::F16 | QuantFormat::BF16 => (0..=u16::MAX).for_each(|h| out.extend(f16_bytes(h))),
        QuantFormat::F32 => {
            let specials = [
                0.0f32,
                -0.0,
                f32::MIN_POSITIVE,
                -f32::MIN_POSITIVE,
                f32::from_bits(1),
                f32::from_bits(0x8000_0001),
                f32::MAX,
                f32::MIN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::from_bits(0x7fc0_0000),
                f32::from_bits(0xffc0_0001),
                f32::from_bits(0x7f80_0001),
                1.0,
                -1.5,
            ];
            specials.iter().for_each(|v| out.extend(v.to_le_bytes()));
            // Random bit patterns: every exponent, sign and payload shows up.
            (0..20_000).for_each(|_| out.extend((rng.next_u64() as u32).to_le_bytes()));
        }
        QuantFormat::Q8_0 => {
            // Every f16 pattern as the scale; byte j of block i is (i * 32 + j) mod 256, so
            // every int8 value, -128 included, meets many scales.
            for i in 0..=u16::MAX as usize {
                out.extend(f16_bytes(i as u16));
                out.extend((0..32).map(|j| ((i * 32 + j) % 256) as u8));
            }
            for _ in 0..2000 {
                out.extend(f16_of(rng.uniform() * 0.1));
                out.extend((0..32).map(|_| rng.next_u64() as u8));
            }
        }
        QuantFormat::Q4_0 | QuantFormat::Q4_1 | QuantFormat::Q5_0 | QuantFormat::Q5_1 => {
            // Every f16 pattern as the scale, every nibble value in both halves of a byte,
            // high bits (Q5) from a multiplicative hash; minimums (Q4_1, Q5_1) from the special
            // patterns and random ones.
            let has_min = matches!(format, QuantFormat::Q4_1 | QuantFormat::Q5_1);
            let has_qh = matches!(format, QuantFormat::Q5_0 | QuantFormat::Q5_1);
            for i in 0..=u16::MAX as usize {
                out.extend(f16_bytes(i as u16));
                if has_min {
                    let m = if i % 3 == 0 {
                        SPECIAL_F16[(i / 3) % SPECIAL_F16.len()]
                    } else {
                        let b = f16_of(rng.uniform() * 4.0);
                        u16::from_le_bytes([b[0], b[1]])
                    };
                    out.extend(f16_bytes(m));
                }
                if has_qh {
                    out.extend((i as u32).wrapping_mul(0x9e37_79b9).to_le_bytes());
                }
                out.extend((0..16).map(|j| (((i + j) % 16) | (((i + 5 * j + 3) % 16) << 4)) as u8));
            }
            for _ in 0..2000 {
                out.extend(f16_of(rng.uniform() * 0.1));
                if has_min {
                    out.extend(f16_of(rng.uniform() * -0.8));
                }
                if has_qh {
                    out.extend((rng.next_u64() as u32).to_le_bytes());
                }
                out.extend((0..16).map(|_| rng.next_u64() as u8));
            }
        }
        QuantFormat::Q2_G64 | QuantFormat::Q3_G64 => {
            // Every f16 pattern as the scale, offsets from the special patterns and random
            // ones, random crumbs and third bits; then blocks with realistic scales.
            let bb = format.block_bytes();
            for i in 0..=u16::MAX as usize + 2000 {
                let mut block: Vec<u8> = (0..bb).map(|_| rng.next_u64() as u8).collect();
                let realistic = i > u16::MAX as usize;
                let d = if realistic { f16_of(rng.uniform() * 0.01) } else { f16_bytes(i as u16).to_vec() };
                let m = if !realistic && i % 3 == 0 {
                    f16_bytes(SPECIAL_F16[(i / 3) % SPECIAL_F16.len()]).to_vec()
                } else {
                    f16_of(rng.uniform() * -0.05)
                };
                block[0..2].copy_from_slice(&d);
                block[2..4].copy_from_slice(&m);
                out.extend(block);
            }
        }
        QuantFormat::Q2_K | QuantFormat::Q3_K | QuantFormat::Q4_K | QuantFormat::Q5_K | QuantFormat::Q6_K => {
            // Random bytes (every scale and value byte shows up many times), with every f16
            // pattern as the super-block scale `d` and, where there is one, `dmin` from the
            // special patterns and random ones; then blocks with realistic scales.
            let (d_at, dmin_at) = match format {
                QuantFormat::Q2_K => (80, Some(82)),
                QuantFormat::Q3_K => (108, None),
                QuantFormat::Q6_K => (208, None),
                _ => (0, Some(2)),
            };
            let bb = format.block_bytes();
            for i in 0..=u16::MAX as usize + 2000 {
                let mut block: Vec<u8> = (0..bb).map(|_| rng.next_u64() as u8).collect();
                let realistic = i > u16::MAX as usize;
                let d = if realistic { f16_of(rng.uniform() * 0.01) } else { f16_bytes(i as u16).to_vec() };
                block[d_at..d_at + 2].copy_from_slice(&d);
                if let Some(at) = dmin_at {
                    let dmin = if !realistic && i % 3 == 0 {
                        f16_bytes(SPECIAL_F16[(i / 3) % SPECIAL_F16.len()]).to_vec()
                    } else {
                        f16_of(rng.uniform() * 0.02)
                    };
                    block[at..at + 2].copy_from_slice(&dmin);
                }
                out.extend(block);
            }
        }
    }
    out
}

#[test]
fn every_format_dequantizes_like_gguf_py() {
    let dir = scratch_dir("dequant/blocks");
    let mut rng = Rng::new(0x6767_7566);
    for format in QuantFormat::ALL {
        let raw = test_blocks(format, &mut rng);
        let (bv, bb) = (format.block_values(), format.block_bytes());
        assert_eq!(raw.len() % bb, 0);
        let n = raw.len() / bb * bv;
        let bin = dir.join(format!("{}.bin", format.name()));
        let npy = dir.join(format!("{}.npy", format.name()));
        std::fs::write(&bin, &raw).unwrap();
        run_gguf_py(&[OsStr::new("dequantize"), OsStr::new(format.name()), bin.as_os_str(), npy.as_os_str()]);
        let peer = read_npy_f32(&npy);
        // One row of all blocks (the float formats: a row of all values).
        let kiln = dequantize(format, &raw, 1, n);
        let quiet_only = compare(format.name(), &kiln, &peer, bv, &raw, bb);
        let nans = kiln.iter().filter(|v| v.is_nan()).count();
        let infs = kiln.iter().filter(|v| v.is_infinite()).count();
        let subnormal = kiln.iter().filter(|v| v.is_subnormal()).count();
        eprintln!(
            "{}: {n} values equal to gguf-py's ({nans} NaN, {quiet_only} of them up to the quiet bit; {infs} \
             infinite, {subnormal} subnormal)",
            format.name()
        );
        // The edge cases are really there.
        assert!(nans > 0 && infs > 0, "{}: the test blocks lack NaN or inf results", format.name());
    }
}

/// Rows for the quantizer comparison: random at several scales, and edge-case blocks (zeros,
/// constant, halfway values, a single outlier, the largest magnitude negative, two largest
/// magnitudes of opposite sign, f16-subnormal and f16-overflowing scales).
fn quantizer_rows(rng: &mut Rng) -> Vec<f32> {
    let mut v = vec![];
    for scale in [1.0f32, 0.02, 300.0, 1e-6, 7e4] {
        for _ in 0..64 {
            v.extend(rng.vec(BLOCK_SIZE, scale));
        }
    }
    v.extend([0.0f32; 32]);
    v.extend([0.3f32; 32]);
    v.extend([-2.5f32; 32]);
    v.extend((0..32).map(|i| (i as f32 - 16.0) * 0.5));
    v.extend((0..32).map(|i| (i as f32 - 15.0) * 127.0 / 16.0 / 2.0));
    v.extend((0..32).map(|i| if i == 7 { 50.0 } else { 0.001 * i as f32 }));
    v.extend((0..32).map(|i| if i == 3 { -9.0 } else { (i as f32).sin() }));
    v.extend((0..32).map(|i| match i {
        4 => 2.0,
        20 => -2.0,
        _ => (i as f32).cos(),
    }));
    v.extend((0..32).map(|i| match i {
        4 => -2.0,
        20 => 2.0,
        _ => (i as f32).cos(),
    }));
    v.extend((0..32).map(|i| (i as f32 - 16.0) * 1e-9));
    v.extend((0..32).map(|i| (i as f32 - 16.0) * 1e4));
    v
}

#[test]
fn quantize_row_matches_gguf_py() {
    // gguf-py 0.19 quantizes F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (Q8_0 documented
    // as bit-exact with ggml-quants.c's reference quantizer; the others follow
    // quantize_row_*_ref and ggml_compute_fp32_to_bf16). It has no K-quant quantizer: those
    // are compared with ggml's own by round-trip error below.
    let dir = scratch_dir("dequant/quantize");
    let mut rng = Rng::new(0x7175_616e);
    let values = quantizer_rows(&mut rng);
    let input = dir.join("values.f32");
    std::fs::write(&input, values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    for format in QuantFormat::ALL.into_iter().filter(|f| !K_QUANTS.contains(f) && !KILN_FORMATS.contains(f)) {
        let out = dir.join(format!("{}.bin", format.name()));
        run_gguf_py(&[OsStr::new("quantize"), OsStr::new(format.name()), input.as_os_str(), out.as_os_str()]);
        let peer = std::fs::read(&out).unwrap();
        let kiln = quantize_row(format, &values);
        assert_eq!(kiln.len(), peer.len(), "{}: byte counts differ", format.name());
        let bb = format.block_bytes();
        let bad: Vec<usize> =
            (0..kiln.len() / bb).filter(|&b| kiln[b * bb..(b + 1) * bb] != peer[b * bb..(b + 1) * bb]).collect();
        for &b in bad.iter().take(4) {
            let bv = format.block_values();
            eprintln!(
                "{} block {b}: values {:?}\n  kiln    {:02x?}\n  gguf-py {:02x?}",
                format.name(),
                &values[b * bv..(b + 1) * bv],
                &kiln[b * bb..(b + 1) * bb],
                &peer[b * bb..(b + 1) * bb]
            );
        }
        assert!(bad.is_empty(), "{}: {} blocks quantize differently from gguf-py", format.name(), bad.len());
    }
}

fn model_path() -> PathBuf {
    PathBuf::from(std::env::var_os("KILN_MODEL").expect(
        "KILN_MODEL is not set: point it at the test model's GGUF file \
         (SmolLM2-135M-Instruct.Q4_1.gguf); CI always sets it",
    ))
}

#[test]
fn real_model_tensors_dequantize_like_gguf_py() {
    let path = model_path();
    let gguf = GgufFile::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let (python, script) = (python(), peer_script("gguf_quants.py"));
    let mut child = Command::new(&python)
        .arg(&script)
        .arg("model")
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {python} {}: {e}", script.display()));
    // Read stderr on another thread so a chatty child cannot block on a full pipe.
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut stream = BufReader::with_capacity(1 << 20, child.stdout.take().unwrap());
    let mut seen: Vec<(String, &'static str, usize)> = vec![];
    let mut end = None;
    let mut line = String::new();
    loop {
        line.clear();
        if stream.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields[..] {
            ["end", count] => {
                end = Some(count.parse::<usize>().unwrap());
                break;
            }
            ["tensor", name, type_id, dims, n] => {
                let n: usize = n.parse().unwrap();
                let mut bytes = vec![0u8; n * 4];
                stream.read_exact(&mut bytes).unwrap_or_else(|e| panic!("{name}: gguf-py's stream ended early: {e}"));
                let peer: Vec<f32> =
                    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                drop(bytes);
                let info = gguf.tensor(name).unwrap_or_else(|e| panic!("gguf-py lists {name}, kiln's reader: {e}"));
                let dims: Vec<u64> = dims.split(',').map(|d| d.parse().unwrap()).collect();
                assert_eq!(info.dims, dims, "{name}: dims");
                assert_eq!(info.ggml_type.id(), type_id.parse::<u32>().unwrap(), "{name}: ggml type");
                let format = info
                    .ggml_type
                    .quant_format()
                    .unwrap_or_else(|| panic!("{name}: type {} is not one kiln compiles", info.ggml_type.name()));
                let cols = dims[0] as usize;
                assert_eq!(n % cols, 0, "{name}: {n} values, rows of {cols}");
                let raw = gguf.tensor_data(info);
                let kiln = dequantize(format, raw, n / cols, cols);
                let quiet_only = compare(name, &kiln, &peer, format.block_values(), raw, format.block_bytes());
                assert_eq!(quiet_only, 0, "{name}: NaN weights in the real model");
                seen.push((name.to_owned(), format.name(), n));
            }
            _ => panic!("unexpected line from gguf_quants.py: {line:?}"),
        }
    }
    let status = child.wait().unwrap();
    let stderr = err_reader.join().unwrap();
    assert!(
        status.success(),
        "gguf_quants.py model failed ({status}); is the gguf package installed (`{python} -m pip install {}`)? \
         stderr:\n{stderr}",
        peers::GGUF_PY
    );
    assert_eq!(end, Some(seen.len()), "gguf_quants.py did not finish its stream");
    assert_eq!(seen.len(), gguf.tensors.len(), "gguf-py and kiln list different numbers of tensors");
    let mut per_format = std::collections::BTreeMap::<&str, (usize, usize)>::new();
    for (_, f, n) in &seen {
        let e = per_format.entry(f).or_default();
        e.0 += 1;
        e.1 += n;
    }
    eprintln!("every tensor of {} equals gguf-py's bit for bit: {per_format:?} (tensors, values)", path.display());
    for f in ["q4_1", "q8_0", "f32"] {
        assert!(per_format.contains_key(f), "the real model has no {f} tensor: {per_format:?}");
    }
}

/// The K-quant formats: gguf-py cannot quantize them, ggml's reference quantizers can.
/// kiln's own formats: gguf_quants.py dequantizes them with its own numpy code (gguf-py does not
/// know them); there is no quantizer to compare with.
const KILN_FORMATS: [QuantFormat; 2] = [QuantFormat::Q2_G64, QuantFormat::Q3_G64];

const K_QUANTS: [QuantFormat; 5] =
    [QuantFormat::Q2_K, QuantFormat::Q3_K, QuantFormat::Q4_K, QuantFormat::Q5_K, QuantFormat::Q6_K];

/// Runs `tests/peer/ggml_quants.py quantize` (ggml's `quantize_row_*_ref` through the
/// libggml-base of llama-cpp-python) on `input`, returning the blocks; fails when it cannot.
fn ggml_quantize(format: QuantFormat, input: &Path, out: &Path) -> Vec<u8> {
    let (python, script) = (python(), peer_script("ggml_quants.py"));
    let res = Command::new(&python)
        .arg(&script)
        .args([OsStr::new("quantize"), OsStr::new(format.name()), input.as_os_str(), out.as_os_str()])
        .output()
        .unwrap_or_else(|e| panic!("running {python} {}: {e} (set KILN_PYTHON to a Python 3)", script.display()));
    assert!(
        res.status.success(),
        "ggml_quants.py quantize {} failed ({}); is llama-cpp-python installed (`{python} -m pip install {}`, which \
         `cargo xtask test` does)? stderr:\n{}",
        format.name(),
        res.status,
        peers::LLAMA_CPP_PYTHON,
        String::from_utf8_lossy(&res.stderr)
    );
    std::fs::read(out).unwrap()
}

/// Sum of squared differences, in f64.
fn squared_error(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum()
}

/// kiln's K-quant quantizers against ggml's reference ones (`quantize_row_*_ref`, what
/// llama-quantize does without an importance matrix) on the real model's weights: every 2-D
/// tensor is dequantized to f32 (from the Q4_1 file, by kiln), quantized by both, and
/// dequantized again by kiln; kiln's root-mean-square error must be no larger than ggml's, on
/// every tensor and overall. SmolLM2's rows (576, 1536 values) are not whole super-blocks, so
/// each tensor is quantized as one flat row (every tensor holds a whole number of 256-value
/// super-blocks). ggml's bytes, dequantized by kiln, must also equal gguf-py's dequantization
/// bit for bit: real-model K-quant blocks for the dequantizer test.
///
/// By default a sample (every 16th matrix and the first 1024 rows of the embedding) keeps it
/// fast; `KILN_QUANT_ALL_TENSORS=1` takes every 2-D tensor in full (the figures in the commit
/// log come from that).
#[test]
fn k_quant_quantizers_lose_no_more_than_ggmls_on_the_real_model() {
    let path = model_path();
    let gguf = GgufFile::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let all = std::env::var_os("KILN_QUANT_ALL_TENSORS").is_some();
    let matrices: Vec<_> = gguf.tensors.iter().filter(|t| t.dims.len() == 2).collect();
    // (name, f32 values), grouped into batches of at most 16 M values (one peer call each).
    let mut batches: Vec<Vec<(String, Vec<f32>)>> = vec![vec![]];
    for (i, info) in matrices.iter().enumerate() {
        let (cols, rows) = (info.dims[0] as usize, info.dims[1] as usize);
        let format = info.ggml_type.quant_format().expect("a kiln format");
        let keep_rows = if all {
            rows
        } else if info.name == "token_embd.weight" {
            rows.min(1024)
        } else if i % 16 == 0 {
            rows
        } else {
            continue;
        };
        let raw = &gguf.tensor_data(info)[..keep_rows * format.row_bytes(cols).unwrap()];
        let values = dequantize(format, raw, keep_rows, cols);
        assert_eq!(values.len() % 256, 0, "{}: not whole super-blocks", info.name);
        let batch_len: usize = batches.last().unwrap().iter().map(|(_, v)| v.len()).sum();
        if batch_len > 0 && batch_len + values.len() > 16 << 20 {
            batches.push(vec![]);
        }
        batches.last_mut().unwrap().push((info.name.clone(), values));
    }
    let dir = scratch_dir("dequant/k_quants");
    let n_tensors: usize = batches.iter().map(|b| b.len()).sum();
    let n_values: usize = batches.iter().flatten().map(|(_, v)| v.len()).sum();
    eprintln!("{n_tensors} tensors, {n_values} values");
    for format in K_QUANTS {
        let (mut kiln_sq, mut ggml_sq, mut same_blocks, mut blocks) = (0.0f64, 0.0f64, 0usize, 0usize);
        let mut worse = vec![];
        for (b, batch) in batches.iter().enumerate() {
            let values: Vec<f32> = batch.iter().flat_map(|(_, v)| v.iter().copied()).collect();
            let input = dir.join(format!("batch{b}.f32"));
            std::fs::write(&input, values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
            let ggml_file = dir.join(format!("batch{b}.{}", format.name()));
            let ggml = ggml_quantize(format, &input, &ggml_file);
            let kiln = quantize_row(format, &values);
            assert_eq!(kiln.len(), ggml.len(), "{}: byte counts differ", format.name());
            let bb = format.block_bytes();
            blocks += kiln.len() / bb;
            same_blocks += kiln.chunks_exact(bb).zip(ggml.chunks_exact(bb)).filter(|(a, b)| a == b).count();
            let kiln_back = dequantize(format, &kiln, 1, values.len());
            let ggml_back = dequantize(format, &ggml, 1, values.len());
            // kiln's dequantization of ggml's blocks equals gguf-py's.
            let npy = dir.join(format!("batch{b}.{}.npy", format.name()));
            run_gguf_py(&[OsStr::new("dequantize"), OsStr::new(format.name()), ggml_file.as_os_str(), npy.as_os_str()]);
            compare(&format!("{} of ggml's blocks", format.name()), &ggml_back, &read_npy_f32(&npy), 256, &ggml, bb);
            let mut at = 0;
            for (name, v) in batch {
                let range = at..at + v.len();
                let (k, g) = (squared_error(v, &kiln_back[range.clone()]), squared_error(v, &ggml_back[range]));
                if k > g {
                    worse.push(format!(
                        "{name}: rmse {:.6e} vs ggml {:.6e}",
                        (k / v.len() as f64).sqrt(),
                        (g / v.len() as f64).sqrt()
                    ));
                }
                kiln_sq += k;
                ggml_sq += g;
                at += v.len();
            }
        }
        let (kiln_rmse, ggml_rmse) = ((kiln_sq / n_values as f64).sqrt(), (ggml_sq / n_values as f64).sqrt());
        eprintln!(
            "{}: rmse kiln {kiln_rmse:.6e}, ggml {ggml_rmse:.6e} (ratio {:.6}); {same_blocks} of {blocks} blocks \
             byte-identical to ggml's",
            format.name(),
            kiln_rmse / ggml_rmse
        );
        assert!(
            worse.is_empty(),
            "{}: kiln's quantizer loses more than ggml's on {} tensors: {worse:#?}",
            format.name(),
            worse.len()
        );
        assert!(
            kiln_rmse <= ggml_rmse && kiln_rmse > 0.0,
            "{}: rmse kiln {kiln_rmse} vs ggml {ggml_rmse}",
            format.name()
        );
    }
}
