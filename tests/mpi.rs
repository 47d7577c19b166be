//! Data-parallel runs under `mpirun` (the `mpi` feature; CI installs Open MPI from Debian): the
//! replicas stay bit-identical through the gradients' all-reduce and notice when they part, one
//! process under mpirun is a plain run, the MI term of K processes is the whole batch's, a rank
//! that dies stops the job naming it and the run resumes, and mismatched options or process
//! counts are refused.
#![cfg(feature = "mpi")]

use crate::reliability::{metrics_without_timing, scratch};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A small run: checkpoints at steps 2, 4, ...; batches that split over 2 processes.
const RUN: &[&str] = &["train", "--width", "8", "--batch", "16", "--unlabeled-batch", "32"];

/// `mpirun -np n muscle ARGS` (as root in containers, oversubscribed on a 2-core machine, no
/// binding so that --threads decides), under `timeout 90` so that a hang is a failure (300 on
/// the emulated device, which runs kernels as C++ a thousand times slower than a GPU).
fn mpirun(n: usize, env: &[(&str, &str)], args: &[&str]) -> Output {
    let limit = if env.iter().any(|&(k, _)| k == "MUSCLE_CUDA_EMU") { "300" } else { "90" };
    let mut c = Command::new("timeout");
    c.args([limit, "mpirun", "--oversubscribe", "--bind-to", "none", "-np", &n.to_string()])
        .arg(env!("CARGO_BIN_EXE_muscle"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env_remove("MUSCLE_CUDA_EMU")
        .env_remove("MUSCLE_FAULT");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("mpirun (openmpi-bin) must be installed for the mpi feature's tests")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", text(&o));
    o
}

fn args<'a>(extra: &[&'a str], out: &'a Path) -> Vec<&'a str> {
    let mut v: Vec<&str> = RUN.to_vec();
    v.extend_from_slice(extra);
    v.extend(["--out", out.to_str().expect("utf8")]);
    v
}

#[test]
fn two_ranks_stay_bit_identical_and_part_without_the_all_reduce() {
    let d = scratch("mpi-two-ranks");
    // 30 steps, the replicas' weights compared at each evaluation (steps 10, 20, 30).
    let out = d.join("a");
    ok(mpirun(2, &[], &args(&["--steps", "30", "--eval-every", "10", "--threads", "1"], &out)));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).expect("config")).expect("json");
    assert_eq!(config["world_size"], 2);
    assert_eq!(metrics_without_timing(&out).len(), 3);
    // Skipping one step's all-reduce parts the replicas: the next comparison stops the job.
    let o = mpirun(2, &[("MUSCLE_FAULT", "allreduce@3")], &args(&["--steps", "8", "--eval-every", "4"], &d.join("b")));
    assert!(!o.status.success() && text(&o).contains("step 4") && text(&o).contains("diverged"), "{}", text(&o));
    // A batch that does not split over the processes is refused, naming the flag.
    let o = mpirun(2, &[], &["train", "--batch", "15", "--steps", "1"]);
    assert!(!o.status.success() && text(&o).contains("--batch 15"), "{}", text(&o));
}

/// The largest difference between two checkpoints' f32 tensors, relative to each tensor's
/// largest magnitude (names and shapes must agree).
fn max_relative_difference(a: &Path, b: &Path) -> f64 {
    use muscle::train::checkpoint::{Checkpoint, Values};
    let (a, b) = (Checkpoint::load(a).expect("a"), Checkpoint::load(b).expect("b"));
    assert_eq!(a.entries.len(), b.entries.len());
    let mut worst = 0.0f64;
    for (x, y) in a.entries.iter().zip(&b.entries) {
        assert_eq!((&x.name, &x.shape), (&y.name, &y.shape));
        if let (Values::F32(u), Values::F32(v)) = (&x.values, &y.values) {
            let scale = u.iter().fold(1e-6f64, |m, &t| m.max(t.abs() as f64));
            for (&p, &q) in u.iter().zip(v) {
                worst = worst.max((p as f64 - q as f64).abs() / scale);
            }
        }
    }
    worst
}

#[test]
fn with_sync_bn_two_ranks_train_like_one_process_on_the_same_global_batches() {
    let d = scratch("mpi-sync-bn");
    let extra = ["--steps", "5", "--eval-every", "5", "--threads", "1"];
    let with = |x: &[&'static str]| -> Vec<&'static str> { extra.iter().chain(x).copied().collect() };
    let (one, synced, local) = (d.join("one"), d.join("synced"), d.join("local"));
    let plain = Command::new(env!("CARGO_BIN_EXE_muscle"))
        .args(args(&with(&["--sync-bn"]), &one))
        .env_remove("MUSCLE_CUDA_EMU")
        .env_remove("MUSCLE_FAULT")
        .output()
        .expect("plain run");
    ok(plain);
    ok(mpirun(2, &[], &args(&with(&["--sync-bn"]), &synced)));
    ok(mpirun(2, &[], &args(&extra, &local)));
    // Weights, BN's running statistics and the EMA: the synchronised run is the one-process run
    // up to the order of its sums; per-process statistics (DDP's default) are another objective.
    let (near, far) = (
        max_relative_difference(&one.join("checkpoint.safetensors"), &synced.join("checkpoint.safetensors")),
        max_relative_difference(&one.join("checkpoint.safetensors"), &local.join("checkpoint.safetensors")),
    );
    eprintln!("sync-bn: {near:e} from one process; per-rank statistics: {far:e}");
    assert!(near < 1e-4, "--sync-bn over 2 ranks is {near} away from one process");
    assert!(
        far > 10.0 * near.max(1e-4),
        "per-rank statistics are only {far} away (sync-bn: {near}): the test proves nothing"
    );
}

/// GPU ranks (`--device cuda`; here each process's emulated device, the gradients, the MI joint
/// and --sync-bn's statistics gathered through NCCL's stand-in and summed on the device in rank
/// order) stay bit-identical (the replica check at the evaluation stops the job otherwise), train
/// as host ranks do, and with --sync-bn as one process does.
#[test]
fn gpu_ranks_stay_bit_identical_and_train_like_host_ranks() {
    let d = scratch("mpi-gpu");
    // The MI weight at full strength from step 0 (--ramp 0), so its joint's sum takes part.
    let extra = ["--steps", "3", "--eval-every", "3", "--threads", "1", "--ramp", "0"];
    let with = |x: &[&'static str]| -> Vec<&'static str> { extra.iter().chain(x).copied().collect() };
    let emu = [("MUSCLE_CUDA_EMU", "1")];
    let (gpus, synced, hosts, one) = (d.join("gpus"), d.join("synced"), d.join("hosts"), d.join("one"));
    ok(mpirun(2, &emu, &args(&with(&["--device", "cuda"]), &gpus)));
    ok(mpirun(2, &emu, &args(&with(&["--device", "cuda", "--sync-bn"]), &synced)));
    ok(mpirun(2, &[], &args(&extra, &hosts)));
    let plain = Command::new(env!("CARGO_BIN_EXE_muscle"))
        .args(args(&extra, &one))
        .env_remove("MUSCLE_CUDA_EMU")
        .env_remove("MUSCLE_FAULT")
        .output()
        .expect("plain run");
    ok(plain);
    let summary = std::fs::read_to_string(gpus.join("summary.json")).expect("summary");
    assert!(summary.contains("cuda:0 (emulated)"), "{summary}");
    // Convolutions sum in other orders on the GPU: near, not bit-equal. Per-process BN statistics
    // (DDP's default) are another objective than one process's: far.
    let ck = |p: &Path| p.join("checkpoint.safetensors");
    let like_hosts = max_relative_difference(&ck(&gpus), &ck(&hosts));
    let like_one = max_relative_difference(&ck(&synced), &ck(&one));
    let far = max_relative_difference(&ck(&one), &ck(&hosts));
    eprintln!("GPU ranks: {like_hosts:e} from host ranks; with --sync-bn {like_one:e} from one process; one process from host ranks: {far:e}");
    assert!(like_hosts < 1e-3, "GPU ranks are {like_hosts} away from host ranks");
    assert!(like_one < 1e-3, "GPU ranks with --sync-bn are {like_one} away from one process");
    let near = like_hosts.max(like_one).max(1e-3);
    assert!(far > 10.0 * near, "one process is only {far} away from host ranks: the test proves nothing");
}

#[test]
fn one_process_under_mpirun_writes_the_bytes_of_a_plain_run() {
    let d = scratch("mpi-one");
    let (a, b) = (d.join("a"), d.join("b"));
    let extra = ["--steps", "6", "--eval-every", "3", "--threads", "2"];
    ok(mpirun(1, &[], &args(&extra, &a)));
    let plain = Command::new(env!("CARGO_BIN_EXE_muscle"))
        .args(args(&extra, &b))
        .env_remove("MUSCLE_CUDA_EMU")
        .output()
        .expect("plain run");
    ok(plain);
    for f in ["checkpoint.safetensors", "resume.safetensors"] {
        assert!(std::fs::read(a.join(f)).expect("a") == std::fs::read(b.join(f)).expect("b"), "{f} differs");
    }
    assert_eq!(metrics_without_timing(&a), metrics_without_timing(&b));
}

#[test]
fn the_mi_loss_over_two_ranks_is_the_loss_of_the_whole_batch() {
    let d = scratch("mpi-mi");
    let mut rng = muscle::rng::Rng::new(23, 0);
    let (rows, cols) = (64, 10);
    for name in ["a", "b"] {
        let data = (0..rows * cols).map(|_| 2.0 * rng.normal() as f64).collect();
        let m = muscle::npy::Matrix { rows, cols, data };
        std::fs::write(d.join(format!("{name}.npy")), muscle::npy::npy_bytes(&m)).expect("write");
    }
    let (a, b) = (d.join("a.npy"), d.join("b.npy"));
    let files = ["--logits-a", a.to_str().expect("utf8"), "--logits-b", b.to_str().expect("utf8")];
    let run = |n: usize, engine: &[&'static str], env: &[(&str, &str)]| -> serde_json::Value {
        let mut argv = vec!["mi"];
        argv.extend(files);
        argv.extend(engine);
        let o = ok(mpirun(n, env, &argv));
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).expect("one JSON line")
    };
    let engine = ["--engine"];
    let (one, two, reference) = (run(1, &engine, &[]), run(2, &engine, &[]), run(1, &[], &[]));
    assert_eq!(two["processes"], 2);
    // On GPU ranks (each process's emulated device; the joint gathered through NCCL's stand-in
    // and summed on the device in rank order): the host ranks' loss and gradient.
    let gpus = run(2, &["--engine", "--device", "cuda"], &[("MUSCLE_CUDA_EMU", "1")]);
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().expect("number");
    for k in ["loss", "grad_sq"] {
        let (x, y) = (f(&two, k), f(&gpus, k));
        assert!((x - y).abs() <= 1e-6 * x.abs().max(1e-3), "{k}: host ranks {x}, GPU ranks {y}");
    }
    // Two processes' joint sums in another order than one's: f32 rounding, 1e-5 relative.
    for k in ["loss", "grad_sq"] {
        let (x, y) = (f(&one, k), f(&two, k));
        assert!((x - y).abs() <= 1e-5 * x.abs().max(1e-3), "{k}: one process {x}, two {y}");
        assert!(y != 0.0, "{k} is zero: the check proves nothing");
    }
    // And the engine's f32 loss is the f64 reference's.
    assert!((f(&two, "loss") - f(&reference, "loss")).abs() <= 1e-5, "{two} vs {reference}");
}

#[test]
fn a_rank_that_dies_stops_the_job_naming_it_and_the_run_resumes_to_the_same_bytes() {
    let d = scratch("mpi-kill");
    let (reference, out) = (d.join("a"), d.join("b"));
    let extra = ["--steps", "12", "--eval-every", "2", "--threads", "1"];
    ok(mpirun(2, &[], &args(&extra, &reference)));

    let t = Instant::now();
    let o = mpirun(2, &[("MUSCLE_FAULT", "kill@5")], &args(&extra, &out));
    let took = t.elapsed();
    assert!(!o.status.success() && o.status.code() != Some(124), "not stopped, or a hang: {}", text(&o));
    assert!(took < Duration::from_secs(60), "mpirun took {took:?} to notice");
    assert!(text(&o).contains("rank 1") && text(&o).contains("signal 9"), "{}", text(&o));
    // The last checkpoint is whole.
    muscle::train::checkpoint::Checkpoint::load(&out.join("resume.safetensors")).expect("a loadable checkpoint");
    assert!(!out.join("summary.json").exists());

    // Resuming with another number of processes is refused; with as many it ends on the bytes of
    // the run that was never killed.
    let dir = out.to_str().expect("utf8");
    let o = mpirun(1, &[], &["train", "--resume", dir]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("2 process"), "{}", text(&o));
    ok(mpirun(2, &[], &["train", "--resume", dir]));
    for f in ["checkpoint.safetensors", "resume.safetensors"] {
        let (got, want) = (std::fs::read(out.join(f)).expect("got"), std::fs::read(reference.join(f)).expect("want"));
        assert!(got == want, "the resumed run's {f} differs from the uninterrupted run's");
    }
    assert_eq!(metrics_without_timing(&out), metrics_without_timing(&reference));
}

#[test]
fn processes_with_different_options_are_refused_before_the_first_step() {
    let mut c = Command::new("timeout");
    let bin = env!("CARGO_BIN_EXE_muscle");
    c.args(["90", "mpirun", "--oversubscribe", "-np", "1", bin, "train", "--seed", "1", "--steps", "1"])
        .args([":", "-np", "1", bin, "train", "--seed", "2", "--steps", "1"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    let o = c.output().expect("mpirun");
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("--seed: rank"), "{}", text(&o));
}
