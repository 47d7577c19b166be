//! The IIC mutual-information loss between two views' logits (METHOD.md, "The IIC
//! mutual-information loss (exact)"): a scalar whose backward reaches both logit tensors.

pub mod bench;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use cpu::mi_loss_f64;

use crate::autograd::Tape;
use crate::dist::World;
use crate::error::{Error, Result};
use crate::tensor::{fmt_shape, Tensor};
use cpu as k;

/// Entropies behind one evaluation of the loss, for logging.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MiStats {
    /// L_mi(lambda), as f64.
    pub loss: f64,
    /// H(P) of the (clamped) joint.
    pub joint_entropy: f64,
    /// H(m) of the marginal (see `cpu::MiForward::marginal_entropy`).
    pub marginal_entropy: f64,
}

/// Checks the two logit matrices and lambda; returns (n, C).
fn check(logits_a: &Tensor, logits_b: &Tensor, lambda: f32) -> Result<(usize, usize)> {
    let both = || format!("logits_a {} and logits_b {}", fmt_shape(logits_a.shape()), fmt_shape(logits_b.shape()));
    if logits_a.shape().len() != 2 || logits_b.shape().len() != 2 {
        return Err(Error::shape(format!("mutual_info_loss: expected two n x C matrices, got {}", both())));
    }
    if logits_a.shape() != logits_b.shape() {
        return Err(Error::shape(format!("mutual_info_loss: shapes differ: {}", both())));
    }
    let (n, c) = (logits_a.shape()[0], logits_a.shape()[1]);
    if n == 0 || c < 2 {
        return Err(Error::shape(format!("mutual_info_loss: needs at least 1 row and 2 columns, got {}", both())));
    }
    if !(lambda.is_finite() && lambda > 0.0) {
        return Err(Error::usage(format!("mutual_info_loss: lambda must be finite and > 0, got {lambda}")));
    }
    Ok((n, c))
}

/// L_mi(lambda) between softmax(logits_a) and softmax(logits_b) (n x C each) with its statistics.
pub fn mutual_info_loss_with_stats(
    tape: &Tape,
    logits_a: &Tensor,
    logits_b: &Tensor,
    lambda: f32,
) -> Result<(Tensor, MiStats)> {
    let (out, stats) = mutual_info(tape, logits_a, logits_b, lambda, true, None)?;
    let stats = stats.ok_or_else(|| Error::device("mutual_info_loss_with_stats: no statistics came back"))?;
    Ok((out, stats))
}

/// The op behind every entry point; on a GPU the statistics are downloaded only when asked for.
/// With a `world` of several processes the joint is summed over them (see
/// [`mutual_info_loss_across`]).
fn mutual_info(
    tape: &Tape,
    logits_a: &Tensor,
    logits_b: &Tensor,
    lambda: f32,
    with_stats: bool,
    world: Option<&'static World>,
) -> Result<(Tensor, Option<MiStats>)> {
    let (n, c) = check(logits_a, logits_b, lambda)?;
    let world = world.filter(|w| w.size() > 1);
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("mutual_info_loss", &[logits_a, logits_b])? {
        let (out, s) = cuda::mutual_info(gpu, tape, logits_a, logits_b, (n, c), lambda, with_stats, world)?;
        let stats = s.map(|s| MiStats {
            loss: s.joint_entropy - 2.0 * lambda as f64 * s.marginal_entropy,
            joint_entropy: s.joint_entropy,
            marginal_entropy: s.marginal_entropy,
        });
        return Ok((out, stats));
    }
    // On the host the statistics cost nothing extra: they are returned whether asked for or not.
    let _ = with_stats;
    let fwd = match world {
        Some(w) => k::mi_fwd_reduced(logits_a.data()?, logits_b.data()?, n, c, lambda, &|j| w.sum_f64(j))?,
        None => k::mi_fwd(logits_a.data()?, logits_b.data()?, n, c, lambda),
    };
    // Every process's gradients are averaged over the processes after the backward (the other
    // terms are means over each process's rows); this term is one loss of the whole batch, whose
    // gradient is the sum of the processes' parts: scale by their number to undo the average.
    let ranks = world.map_or(1.0, |w| w.size() as f32);
    let stats = MiStats {
        loss: fwd.joint_entropy - 2.0 * lambda as f64 * fwd.marginal_entropy,
        joint_entropy: fwd.joint_entropy,
        marginal_entropy: fwd.marginal_entropy,
    };
    let out = Tensor::scalar(fwd.loss);
    let (ac, bc) = (logits_a.clone(), logits_b.clone());
    let out = tape.record(out, &[logits_a, logits_b], move |g, grads| {
        let (mut ga, mut gb) = (crate::pool::take(n * c), crate::pool::take(n * c));
        k::mi_bwd(&fwd, n, c, g.item()? * ranks, &mut ga, &mut gb);
        grads.add_to(&ac, Tensor::cpu(ga, vec![n, c]))?;
        grads.add_to(&bc, Tensor::cpu(gb, vec![n, c]))
    });
    Ok((out, Some(stats)))
}

/// L_mi(lambda) between softmax(logits_a) and softmax(logits_b) (n x C each): a scalar.
pub fn mutual_info_loss(tape: &Tape, logits_a: &Tensor, logits_b: &Tensor, lambda: f32) -> Result<Tensor> {
    Ok(mutual_info(tape, logits_a, logits_b, lambda, false, None)?.0)
}

/// L_mi(lambda) of the whole batch of a data-parallel run, each process holding its rows of
/// `logits_a` and `logits_b`: the C x C joint is summed over the processes (in rank order, the
/// same bits on each) before the entropies, so every process gets the loss of the whole batch's
/// joint; the backward gives each process its rows' part of the gradient, times the number of
/// processes (the trainer averages the processes' gradients). A world of one is
/// [`mutual_info_loss`].
pub fn mutual_info_loss_across(
    tape: &Tape,
    logits_a: &Tensor,
    logits_b: &Tensor,
    lambda: f32,
    world: &'static World,
) -> Result<Tensor> {
    Ok(mutual_info(tape, logits_a, logits_b, lambda, false, Some(world))?.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::testing::{check_gradients, randn};

    fn scaled_randn(shape: &[usize], std: f32, seed: u64) -> Tensor {
        let t = randn(shape, seed);
        let v = t.data().map(|d| d.iter().map(|x| std * x).collect()).unwrap_or_default();
        Tensor::cpu(v, shape.to_vec())
    }

    #[test]
    fn gradients_match_finite_differences() {
        for (k, lambda) in [1.0f32, 1.5].into_iter().enumerate() {
            let a = scaled_randn(&[12, 5], 2.0, 31 + k as u64);
            let b = scaled_randn(&[12, 5], 2.0, 41 + k as u64);
            let report =
                check_gradients(&|tape, xs| mutual_info_loss(tape, &xs[0], &xs[1], lambda), &[a, b], 1e-2, 2e-2, 60);
            match report {
                Ok(r) => assert!(r.iter().all(|g| g.norm > 1e-3), "lambda {lambda}: degenerate check {r:?}"),
                Err(e) => panic!("lambda {lambda}: {e}"),
            }
        }
    }

    #[test]
    fn the_same_tensor_as_both_views_gets_both_gradients() {
        let a = scaled_randn(&[10, 4], 2.0, 5);
        let report = check_gradients(&|tape, xs| mutual_info_loss(tape, &xs[0], &xs[0], 1.0), &[a], 1e-2, 2e-2, 40);
        if let Err(e) = report {
            panic!("{e}");
        }
    }

    #[test]
    fn loss_is_a_scalar_and_stats_agree() -> Result<()> {
        let a = scaled_randn(&[20, 6], 2.0, 1);
        let b = scaled_randn(&[20, 6], 2.0, 2);
        let tape = Tape::new();
        let (a, b) = (a.into_param(), b.into_param());
        let (loss, stats) = mutual_info_loss_with_stats(&tape, &a, &b, 1.5)?;
        assert!(loss.shape().is_empty());
        assert!((loss.item()? as f64 - stats.loss).abs() < 1e-6);
        assert!(stats.joint_entropy > 0.0 && stats.marginal_entropy > 0.0);
        let grads = tape.backward(&loss)?;
        assert!(grads.get(&a).is_some() && grads.get(&b).is_some());
        // Untracked inputs record nothing.
        let tape = Tape::new();
        let _ = mutual_info_loss(&tape, &a.detach(), &b.detach(), 1.0)?;
        assert!(tape.is_empty());
        Ok(())
    }

    #[test]
    fn bad_shapes_and_lambda_are_errors_naming_both_shapes() {
        let tape = Tape::new();
        let err = |a: &[usize], b: &[usize], lambda: f32| match mutual_info_loss(
            &tape,
            &Tensor::zeros(a),
            &Tensor::zeros(b),
            lambda,
        ) {
            Ok(_) => panic!("{a:?} {b:?} {lambda}: accepted"),
            Err(e) => e,
        };
        let e = err(&[4, 5], &[4, 6], 1.0);
        assert_eq!(e.kind(), ErrorKind::Shape);
        assert!(e.message().contains("[4, 5]") && e.message().contains("[4, 6]"), "{e}");
        let e = err(&[4, 5], &[5, 5], 1.0);
        assert!(e.message().contains("[4, 5]") && e.message().contains("[5, 5]"), "{e}");
        let e = err(&[2, 4, 5], &[2, 4, 5], 1.0);
        assert!(e.kind() == ErrorKind::Shape && e.message().contains("[2, 4, 5]"), "{e}");
        let e = err(&[20], &[4, 5], 1.0);
        assert!(e.message().contains("[20]") && e.message().contains("[4, 5]"), "{e}");
        assert_eq!(err(&[0, 5], &[0, 5], 1.0).kind(), ErrorKind::Shape);
        assert_eq!(err(&[4, 1], &[4, 1], 1.0).kind(), ErrorKind::Shape);
        for lambda in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert_eq!(err(&[4, 5], &[4, 5], lambda).kind(), ErrorKind::Usage);
        }
    }
}
