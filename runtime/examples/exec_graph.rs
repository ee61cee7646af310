//! Runs any compiled kiln library built as a shared object on f32 inputs: the tool the tests
//! use to execute code compiled for another architecture under qemu-user.
//!
//! `exec_graph LIB.so IN.f32 OUT.f32 SEQ[,SEQ...]` evaluates calls of SEQ rows one after
//! another (positions advance, the KV cache persists). IN holds every call's input rows back
//! to back (one f32 input), OUT receives every call's output rows (one f32 output).

use std::path::Path;

use runtime::program::{Input, Program};

fn main() {
    if let Err(e) = run() {
        eprintln!("exec_graph: {e}");
        std::process::exit(1);
    }
}

fn read_f32(path: &str) -> Result<Vec<f32>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        return Err("usage: exec_graph LIB.so IN.f32 OUT.f32 SEQ[,SEQ...]".into());
    }
    let threads = std::env::var("KILN_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(2);
    let mut program = Program::load_shared(Path::new(&args[1]), None, threads).map_err(|e| e.to_string())?;
    let input = read_f32(&args[2])?;
    let seqs: Vec<usize> =
        args[4].split(',').map(|s| s.parse().map_err(|_| format!("bad SEQ '{s}'"))).collect::<Result<_, _>>()?;
    let d = program.desc();
    let (in_w, out_w) = (d.io_width(0).ok_or("no input")?, d.io_width(1).ok_or("no output")?);
    let (mut pos, mut at) = (0, 0);
    let mut output = Vec::new();
    for seq in seqs {
        let x = input.get(at..at + seq * in_w).ok_or("IN is too short")?;
        let mut y = vec![0.0f32; seq * out_w];
        program.run(&[Input::F32(x)], &mut [&mut y], seq, pos, 0).map_err(|e| e.to_string())?;
        output.extend_from_slice(&y);
        pos += seq;
        at += seq * in_w;
    }
    let bytes: Vec<u8> = output.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&args[3], bytes).map_err(|e| format!("{}: {e}", args[3]))
}
