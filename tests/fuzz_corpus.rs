//! A quick pass over the kept fuzz corpus (`fuzz/corpus/TARGET/*`, grown by `fuzz/run.sh`),
//! through the same property checks the fuzz targets run: every input that once found new
//! behaviour, and every crash that was fixed, stays a regression test.

#[path = "../fuzz/targets.rs"]
mod targets;

use std::path::PathBuf;

#[test]
fn every_kept_fuzz_input_still_holds() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut total = 0;
    for (name, target) in targets::TARGETS {
        let dir = root.join(name);
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
            .map(|entry| entry.expect("entry").path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "no kept corpus for {name}");
        for input in &inputs {
            let data = std::fs::read(input).expect("read input");
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name}: {} fails", input.display());
        }
        total += inputs.len();
    }
    eprintln!("{total} kept fuzz inputs replayed");
}
