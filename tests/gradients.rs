//! Every op's backward against central finite differences on random inputs. The tolerance is
//! relative (||analytic - numeric|| / ||numeric||): a sign error or a dropped term gives O(1).

use crate::common::distinct;
use muscle::ops::{self, Conv2dParams};
use muscle::testing::{check_gradients, rand_uniform, randn};
use muscle::{Result, Tape, Tensor};

const EPS: f32 = 1e-2;
const TOL: f64 = 1e-2;
const PROBES: usize = 60;

fn check(f: &dyn Fn(&Tape, &[Tensor]) -> Result<Tensor>, inputs: &[Tensor]) {
    check_eps(f, inputs, EPS)
}

fn check_eps(f: &dyn Fn(&Tape, &[Tensor]) -> Result<Tensor>, inputs: &[Tensor], eps: f32) {
    let report = check_gradients(f, inputs, eps, TOL, PROBES).expect("gradient check");
    for r in &report {
        assert!(r.norm > 1e-4, "input {} got a vanishing test gradient: the check proves nothing", r.input);
    }
}

#[test]
fn matmul() {
    check(&|t, x| ops::matmul(t, &x[0], &x[1]), &[randn(&[3, 4], 1), randn(&[4, 5], 2)]);
}

#[test]
fn linear() {
    check(&|t, x| ops::linear(t, &x[0], &x[1], Some(&x[2])), &[randn(&[4, 6], 1), randn(&[3, 6], 2), randn(&[3], 3)]);
}

#[test]
fn conv2d_stride_and_padding() {
    for &(stride, pad, k) in &[(1, 1, 3), (2, 1, 3), (1, 0, 3), (2, 0, 1), (1, 0, 1)] {
        let p = Conv2dParams { stride, pad };
        check(
            &|t, x| ops::conv2d(t, &x[0], &x[1], p, Default::default()),
            &[randn(&[3, 2, 6, 5], 1), randn(&[4, 2, k, k], 2)],
        );
    }
}

#[test]
fn batch_norm_train_and_eval() {
    let gamma = randn(&[3], 3);
    check(
        &|t, x| Ok(ops::batch_norm_train(t, &x[0], &x[1], &x[2], 1e-5, None)?.0),
        &[randn(&[4, 3, 3, 2], 1), gamma.clone(), randn(&[3], 4)],
    );
    let (mean, var) = (randn(&[3], 5), rand_uniform(&[3], 0.5, 2.0, 6));
    check(
        &|t, x| ops::batch_norm_eval(t, &x[0], &x[1], &x[2], &mean, &var, 1e-5, None),
        &[randn(&[2, 3, 3, 3], 1), gamma, randn(&[3], 4)],
    );
}

#[test]
fn fused_batch_norm_leaky_relu() {
    // Shifted mean and spread so both sides of the kink and the one-pass variance are exercised.
    let x = || ops::scale(&Tape::no_grad(), &randn(&[4, 3, 3, 3], 1), 3.0).expect("scale");
    let (gamma, beta) = (randn(&[3], 3), randn(&[3], 4));
    // A gamma step moves every z of a channel, so a small step keeps the differences off the
    // activation's kink.
    let f = |t: &Tape, x: &[Tensor]| Ok(ops::batch_norm_train(t, &x[0], &x[1], &x[2], 1e-5, Some(0.1))?.0);
    check_eps(&f, &[x(), gamma.clone(), beta.clone()], 1e-3);
    let (mean, var) = (randn(&[3], 5), rand_uniform(&[3], 0.5, 2.0, 6));
    check_eps(
        &|t, x| ops::batch_norm_eval(t, &x[0], &x[1], &x[2], &mean, &var, 1e-5, Some(0.1)),
        &[x(), gamma.clone(), beta.clone()],
        1e-3,
    );
    // The fused op equals BN followed by LeakyReLU, forward and backward.
    let run = |fused: bool| {
        let ps: Vec<Tensor> = [x(), gamma.clone(), beta.clone()].into_iter().map(|t| t.into_param()).collect();
        let tape = Tape::new();
        let y = if fused {
            ops::batch_norm_train(&tape, &ps[0], &ps[1], &ps[2], 1e-5, Some(0.1)).expect("fused").0
        } else {
            let (z, _) = ops::batch_norm_train(&tape, &ps[0], &ps[1], &ps[2], 1e-5, None).expect("bn");
            ops::leaky_relu(&tape, &z, 0.1).expect("lrelu")
        };
        let proj = randn(y.shape(), 8);
        let g = tape.backward_with(&y, proj).expect("backward");
        let mut out = y.to_vec().expect("cpu");
        for p in &ps {
            out.extend(g.get(p).expect("grad").to_vec().expect("cpu"));
        }
        out
    };
    for (a, b) in run(true).iter().zip(run(false)) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "fused {a} vs composed {b}");
    }
}

#[test]
fn relu_and_leaky_relu() {
    check(&|t, x| ops::relu(t, &x[0]), &[distinct(&[2, 3, 4], 1)]);
    check(&|t, x| ops::leaky_relu(t, &x[0], 0.1), &[distinct(&[2, 3, 4], 2)]);
}

#[test]
fn pooling() {
    check(&|t, x| ops::max_pool2d(t, &x[0], 2), &[distinct(&[2, 3, 5, 4], 1)]);
    check(&|t, x| ops::global_avg_pool(t, &x[0]), &[randn(&[2, 3, 3, 4], 2)]);
}

#[test]
fn dropout_with_a_fixed_mask() {
    check(&|t, x| ops::dropout(t, &x[0], 0.3, 7, 11), &[randn(&[4, 10], 1)]);
}

#[test]
fn add_scale_and_shapes() {
    check(&|t, x| ops::add(t, &x[0], &x[1]), &[randn(&[3, 4], 1), randn(&[3, 4], 2)]);
    check(&|t, x| ops::scale(t, &x[0], -1.7), &[randn(&[3, 4], 1)]);
    check(&|t, x| ops::flatten(t, &x[0]), &[randn(&[2, 3, 2, 2], 1)]);
    check(&|t, x| ops::concat_rows(t, &[&x[0], &x[1]]), &[randn(&[2, 3], 1), randn(&[4, 3], 2)]);
    check(&|t, x| ops::narrow_rows(t, &x[0], 1, 2), &[randn(&[4, 3], 1)]);
}

#[test]
fn a_tensor_used_twice_gets_the_sum() {
    // y = x + lrelu(x) + x*... : two paths from x must both contribute.
    check(&|t, x| ops::add(t, &x[0], &ops::leaky_relu(t, &x[0], 0.1)?), &[distinct(&[3, 4], 1)]);
    check(&|t, x| ops::matmul(t, &x[0], &x[0]), &[randn(&[4, 4], 3)]);
}

#[test]
fn softmax_and_log_softmax() {
    check(&|t, x| ops::softmax(t, &x[0]), &[randn(&[4, 7], 1)]);
    check(&|t, x| ops::log_softmax(t, &x[0]), &[randn(&[4, 7], 2)]);
}

#[test]
fn cross_entropies_and_mse() {
    let labels = [0usize, 3, 6, 2, 2];
    check(&|t, x| ops::cross_entropy(t, &x[0], &labels), &[randn(&[5, 7], 1)]);
    let q = ops::softmax(&Tape::no_grad(), &randn(&[5, 7], 9)).expect("softmax");
    check(&|t, x| ops::cross_entropy_soft(t, &x[0], &q), &[randn(&[5, 7], 2)]);
    check(&|t, x| ops::mse(t, &ops::softmax(t, &x[0])?, &q), &[randn(&[5, 7], 3)]);
}

#[test]
fn pseudo_labelled_cross_entropy_differentiates_the_strong_view_only() {
    // Weak rows 0, 2, 4 spiked (kept at tau 0.95), rows 1 and 3 flat (dropped): no decision sits
    // within a step of EPS, so the loss is flat in the weak logits and a gradient that leaked
    // to them (the pseudo-label is under stop-gradient) would fail the check's relative error.
    let mut w = randn(&[5, 7], 4).to_vec().expect("weak");
    for (i, col) in [(0usize, 3usize), (2, 0), (4, 6)] {
        w[i * 7 + col] += 8.0;
    }
    let weak = Tensor::from_vec(w, &[5, 7]).expect("weak");
    let truth = ops::Indices::from(vec![3, 1, 2, 0, 5]);
    let f = |t: &Tape, x: &[Tensor]| Ok(ops::cross_entropy_pseudo(t, &x[0], &x[1], 0.95, &truth)?.loss);
    let report = check_gradients(&f, &[weak, randn(&[5, 7], 2)], EPS, TOL, PROBES).expect("gradient check");
    assert_eq!(report[0].norm, 0.0, "the loss moved with the weak logits");
    assert!(report[1].norm > 1e-4, "the strong logits got a vanishing test gradient");
}

#[test]
fn a_small_network_end_to_end() {
    // conv -> BN(train) -> LReLU -> max-pool -> GAP -> linear -> CE: the tape chains them all.
    let labels = [1usize, 0, 2];
    let f = |t: &Tape, x: &[Tensor]| -> Result<Tensor> {
        let h = ops::conv2d(t, &x[0], &x[1], Conv2dParams { stride: 1, pad: 1 }, Default::default())?;
        let (h, _) = ops::batch_norm_train(t, &h, &x[2], &x[3], 1e-5, None)?;
        let h = ops::leaky_relu(t, &h, 0.1)?;
        let h = ops::max_pool2d(t, &h, 2)?;
        let h = ops::global_avg_pool(t, &h)?;
        let h = ops::linear(t, &h, &x[4], Some(&x[5]))?;
        ops::cross_entropy(t, &h, &labels)
    };
    check(
        &f,
        &[
            randn(&[3, 2, 6, 6], 1),
            randn(&[4, 2, 3, 3], 2),
            randn(&[4], 3),
            randn(&[4], 4),
            randn(&[3, 4], 5),
            randn(&[3], 6),
        ],
    );
}
