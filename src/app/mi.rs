//! `muscle mi`: the reference IIC loss and its gradients in f64 for two logit matrices, to check
//! other implementations against.

use crate::error::{Error, Result};
use crate::ops::mutual_info::mi_loss_f64;
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
