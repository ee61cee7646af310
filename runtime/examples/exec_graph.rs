//! Runs any compiled kiln library built as a shared object: the tool the tests use to execute
//! code compiled for another architecture under qemu-user.
//!
//! `exec_graph LIB.so IN OUT.f32 SEQ[,SEQ...]` evaluates calls of SEQ rows one after another
//! (positions advance, the KV cache persists). IN holds every call's input rows back to back
//! (one input: little-endian f32 values, or i32 token ids when the library's input is i32),
//! OUT receives every call's output rows (one f32 output).

use std::path::Path;

use runtime::program::{Input, Program, DTYPE_I32};

fn main() {
    if let Err(e) = run() {
        eprintln!("exec_graph: {e}");
        std::process::exit(1);
    }
}

fn read_words(path: &str) -> Result<Vec<[u8; 4]>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    Ok(bytes.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect())
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        return Err("usage: exec_graph LIB.so IN.f32 OUT.f32 SEQ[,SEQ...]".into());
    }
    let threads = std::env::var("KILN_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(2);
    let mut program = Program::load_shared(Path::new(&args[1]), None, threads).map_err(|e| e.to_string())?;
    let words = read_words(&args[2])?;
    let seqs: Vec<usize> =
        args[4].split(',').map(|s| s.parse().map_err(|_| format!("bad SEQ '{s}'"))).collect::<Result<_, _>>()?;
    let d = program.desc();
    let (in_w, out_w) = (d.io_width(0).ok_or("no input")?, d.io_width(1).ok_or("no output")?);
    let ids = d.io_dtype(0) == Some(DTYPE_I32);
    let input_f32: Vec<f32> = if ids { Vec::new() } else { words.iter().map(|w| f32::from_le_bytes(*w)).collect() };
    let input_i32: Vec<i32> = if ids { words.iter().map(|w| i32::from_le_bytes(*w)).collect() } else { Vec::new() };
    let (mut pos, mut at) = (0, 0);
    let mut output = Vec::new();
    for seq in seqs {
        let x = if ids {
            Input::I32(input_i32.get(at..at + seq * in_w).ok_or("IN is too short")?)
        } else {
            Input::F32(input_f32.get(at..at + seq * in_w).ok_or("IN is too short")?)
        };
        let mut y = vec![f32::NAN; seq * out_w];
        program.run(&[x], &mut [&mut y], seq, pos, 0).map_err(|e| e.to_string())?;
        output.extend_from_slice(&y);
        pos += seq;
        at += seq * in_w;
    }
    let bytes: Vec<u8> = output.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&args[3], bytes).map_err(|e| format!("{}: {e}", args[3]))
}
