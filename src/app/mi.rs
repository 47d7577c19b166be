//! `muscle mi`: the reference IIC loss and its gradients in f64 for two logit matrices, to check
//! other implementations against.

use crate::autograd::Tape;
use crate::data::Shard;
use crate::error::{Error, Result};
use crate::npy::Matrix;
use crate::ops;
use crate::ops::mutual_info::mi_loss_f64;
use crate::tensor::Tensor;
use crate::train::checkpoint::{read_matrix, Checkpoint, Entry, Values};
use std::path::PathBuf;

/// The options of `muscle mi`.
#[derive(Clone, Debug, clap::Args)]
pub struct MiArgs {
    /// Logits of the first view, n x C.
    #[arg(long = "logits-a")]
    pub logits_a: PathBuf,
    /// Logits of the second view, n x C.
    #[arg(long = "logits-b")]
    pub logits_b: PathBuf,
    /// IIC lambda (1: mutual information).
    #[arg(long, default_value_t = 1.0)]
    pub lambda: f64,
    /// Write the gradients (grad_a, grad_b, f64) to this .safetensors file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Compute with the engine's f32 op instead of the f64 reference, and print the loss and the
    /// squared norm of its gradient; under `mpirun -np K` each process takes its n / K rows and
    /// the joint is summed over the processes (the data-parallel MI term).
    #[arg(long, conflicts_with = "out")]
    pub engine: bool,
    /// With --engine: the device the op runs on (cpu, or cuda[:N]; under mpirun each process
    /// takes the GPU of its node-local rank, and the joint is summed on the devices).
    #[arg(long, default_value_t = crate::device::Device::Cpu, requires = "engine")]
    pub device: crate::device::Device,
}

/// `muscle mi`: prints the loss as JSON, and writes the gradients to --out when given.
pub fn command(a: &MiArgs) -> Result<()> {
    if !(a.lambda.is_finite() && a.lambda > 0.0) {
        return Err(Error::usage("--lambda: must be a finite value > 0"));
    }
    let (za, zb) = (read_matrix(&a.logits_a)?, read_matrix(&a.logits_b)?);
    if (za.rows, za.cols) != (zb.rows, zb.cols) || za.rows == 0 || za.cols < 2 {
        return Err(Error::usage(format!(
            "--logits-a ({} x {}) and --logits-b ({} x {}) must have the same shape, n >= 1 rows and C >= 2 columns",
            za.rows, za.cols, zb.rows, zb.cols
        )));
    }
    if a.engine {
        return engine(&za, &zb, a.lambda as f32, a.device);
    }
    let (loss, ga, gb) = mi_loss_f64(&za.data, &zb.data, za.rows, za.cols, a.lambda);
    if let Some(out) = &a.out {
        let shape = vec![za.rows, za.cols];
        let ck = Checkpoint {
            entries: vec![
                Entry { name: "grad_a".into(), shape: shape.clone(), values: Values::F64(ga) },
                Entry { name: "grad_b".into(), shape, values: Values::F64(gb) },
            ],
            metadata: [("loss".to_string(), format!("{loss:e}")), ("lambda".to_string(), format!("{}", a.lambda))]
                .into(),
        };
        ck.save(out)?;
    }
    println!("{}", serde_json::json!({"loss": loss, "rows": za.rows, "classes": za.cols, "lambda": a.lambda}));
    Ok(())
}

/// `muscle mi --engine`: the f32 op on this process's rows, the joint summed over the processes.
fn engine(za: &Matrix, zb: &Matrix, lambda: f32, device: crate::device::Device) -> Result<()> {
    let world = crate::dist::world();
    let device = device.for_local_rank(world.local_rank());
    device.check_available()?;
    let k = world.size();
    if !za.rows.is_multiple_of(k) {
        return Err(Error::usage(format!("--logits-a: {} rows do not split evenly over {k} processes", za.rows)));
    }
    let rows = Shard { rank: world.rank(), ranks: k }.rows(za.rows);
    let mine = |m: &Matrix| -> Result<Tensor> {
        let v = m.data[rows.start * m.cols..rows.end * m.cols].iter().map(|&x| x as f32).collect();
        Ok(Tensor::from_vec(v, &[rows.len(), m.cols])?.to_device(device)?.into_param())
    };
    let (ta, tb) = (mine(za)?, mine(zb)?);
    let tape = Tape::new();
    let loss = ops::mutual_info_loss_across(&tape, &ta, &tb, lambda, world)?;
    let value = loss.item()?;
    let grads = tape.backward(&loss)?;
    // Each process's gradient is k times its rows' part of the whole batch's (the trainer
    // averages over the processes): undo that here.
    let mut sq = [0.0f64];
    for t in [&ta, &tb] {
        if let Some(g) = grads.get(t) {
            sq[0] += g.to_vec()?.iter().map(|&v| (v as f64 / k as f64).powi(2)).sum::<f64>();
        }
    }
    world.sum_f64(&mut sq)?;
    if world.is_root() {
        println!(
            "{}",
            serde_json::json!({"loss": value, "grad_sq": sq[0], "rows": za.rows, "classes": za.cols, "processes": k})
        );
    }
    Ok(())
}
