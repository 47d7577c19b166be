//! emu/test.sh's driver of emu/signatures.rs: `render OUT_DIR FILE.cu...` writes
//! OUT_DIR/<stem>.glue.cpp for each kernel file (which includes the file by the path given) and
//! OUT_DIR/index.cpp listing their tables.

#[path = "../signatures.rs"]
mod signatures;

use std::{env, fs, process};

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    let Some((out_dir, paths)) = args.split_first() else {
        eprintln!("usage: render OUT_DIR FILE.cu...");
        process::exit(2);
    };
    let run = || -> Result<(), String> {
        for path in paths {
            let source = fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
            let stem = signatures::table_symbol(path).trim_start_matches("cuda_emu_kernels_").to_string();
            let target = format!("{out_dir}/{stem}.glue.cpp");
            fs::write(&target, signatures::render_glue(path, &source)?).map_err(|e| format!("{target}: {e}"))?;
        }
        let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
        let index = format!("{out_dir}/index.cpp");
        fs::write(&index, signatures::render_index(&paths)).map_err(|e| format!("{index}: {e}"))
    };
    if let Err(message) = run() {
        eprintln!("render: {message}");
        process::exit(1);
    }
}
