//! Replays the fuzz targets' seeds (fuzz/seeds/) and every input a fuzzer
//! ever found a problem with (fuzz/regressions/) through the same decoders
//! the targets in fuzz/fuzz_targets/ call, on stable Rust: none may panic,
//! and the seeds, which are real inputs, must decode.
//!
//! Fuzzing itself: `scripts/fuzz [SECONDS]` (nightly, cargo fuzz).

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// What a target's decoder made of one input: Ok (decoded) or the refusal.
fn decode(target: &str, data: &[u8]) -> Result<(), String> {
    let text = || std::str::from_utf8(data).map_err(|e| e.to_string());
    match target {
        "controller_config" => dicops_config::ControllerConfig::parse(Path::new("/fuzz/controller.yaml"), text()?)
            .map(drop)
            .map_err(|e| e.to_string()),
        "agent_config" => dicops_config::AgentConfig::parse(Path::new("/fuzz/agent.yaml"), text()?)
            .map(drop)
            .map_err(|e| e.to_string()),
        "wire_json" => {
            let report = serde_json::from_slice::<dicops_proto::Report>(data).map(drop);
            let result = serde_json::from_slice::<dicops_proto::TaskResult>(data).map(drop);
            let progress = serde_json::from_slice::<dicops_proto::RunProgress>(data).map(drop);
            report.or(result).or(progress).map_err(|e| e.to_string())
        }
        "chunk_answer" => dicops_agent::fuzzing::chunk_answer(data).map(drop),
        "manifest" => dicops_agent::fuzzing::manifest(data).map(drop),
        other => panic!("fuzz/{other}: no such target (see fuzz/Cargo.toml)"),
    }
}

fn inputs(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for target in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = target.file_name().to_string_lossy().into_owned();
        for file in std::fs::read_dir(target.path()).expect("target folder").flatten() {
            out.push((name.clone(), file.path()));
        }
    }
    out.sort();
    out
}

#[test]
fn every_target_has_seeds_and_every_seed_decodes() {
    let targets = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    let seeds = inputs(&fuzz_dir().join("seeds"));
    for target in targets
        .lines()
        .filter_map(|l| l.strip_prefix("name = \"")?.strip_suffix('"'))
    {
        if target == "dicops-fuzz" {
            continue;
        }
        assert!(
            seeds.iter().any(|(t, _)| t == target),
            "fuzz target {target} has no seed in fuzz/seeds/{target}/"
        );
    }
    for (target, path) in seeds {
        let data = std::fs::read(&path).expect("seed");
        match (target.as_str(), decode(&target, &data)) {
            (_, Ok(())) => {}
            // The example configs name certificate files this machine does
            // not have: the error must be about those files, nothing else.
            ("controller_config" | "agent_config", Err(e)) if e.contains("/etc/dicops/pki/") => {}
            (_, Err(e)) => panic!("seed {} does not decode: {e}", path.display()),
        }
    }
}

#[test]
fn inputs_fuzzers_found_are_refused_without_a_panic() {
    for (target, path) in inputs(&fuzz_dir().join("regressions")) {
        let data = std::fs::read(&path).expect("regression input");
        // A panic fails this test and names the file through the message.
        eprintln!("{}: {:?}", path.display(), decode(&target, &data).err());
    }
}
