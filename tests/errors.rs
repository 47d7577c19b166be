//! Bad shapes are errors that name both shapes, never panics; an unknown word for a choice is a
//! usage error with the message users have always seen.

use muscle::ops::{self, Conv2dParams};
use muscle::testing::randn;
use muscle::{ErrorKind, Tape};

fn expect_shape_err<T: std::fmt::Debug>(r: muscle::Result<T>, needles: &[&str]) {
    let e = r.expect_err("must be an error");
    assert_eq!(e.kind(), ErrorKind::Shape, "{e}");
    for n in needles {
        assert!(e.message().contains(n), "message '{e}' does not name {n}");
    }
}

#[test]
fn every_op_rejects_mismatched_shapes() {
    let t = Tape::new();
    expect_shape_err(ops::matmul(&t, &randn(&[3, 4], 1), &randn(&[5, 2], 2)), &["[3, 4]", "[5, 2]"]);
    expect_shape_err(ops::add(&t, &randn(&[3, 4], 1), &randn(&[4, 3], 2)), &["[3, 4]", "[4, 3]"]);
    expect_shape_err(ops::linear(&t, &randn(&[2, 5], 1), &randn(&[3, 4], 2), None), &["[2, 5]", "[3, 4]"]);
    expect_shape_err(
        ops::conv2d(
            &t,
            &randn(&[1, 3, 8, 8], 1),
            &randn(&[4, 2, 3, 3], 2),
            Conv2dParams { stride: 1, pad: 1 },
            Default::default(),
        ),
        &["[1, 3, 8, 8]", "[4, 2, 3, 3]"],
    );
    expect_shape_err(
        ops::conv2d(
            &t,
            &randn(&[1, 2, 2, 2], 1),
            &randn(&[4, 2, 3, 3], 2),
            Conv2dParams { stride: 1, pad: 0 },
            Default::default(),
        ),
        &["[1, 2, 2, 2]", "[4, 2, 3, 3]"],
    );
    expect_shape_err(
        ops::conv2d(
            &t,
            &randn(&[3, 8, 8], 1),
            &randn(&[4, 3, 3, 3], 2),
            Conv2dParams { stride: 1, pad: 1 },
            Default::default(),
        ),
        &["[3, 8, 8]"],
    );
    expect_shape_err(
        ops::batch_norm_train(&t, &randn(&[2, 3, 4, 4], 1), &randn(&[4], 2), &randn(&[3], 3), 1e-5, None),
        &["[4]", "[2, 3, 4, 4]"],
    );
    expect_shape_err(ops::max_pool2d(&t, &randn(&[1, 1, 1, 1], 1), 2), &["[1, 1, 1, 1]"]);
    expect_shape_err(ops::cross_entropy(&t, &randn(&[3, 4], 1), &[0, 1]), &["[3, 4]"]);
    expect_shape_err(ops::cross_entropy(&t, &randn(&[2, 4], 1), &[0, 4]), &["label 4"]);
    expect_shape_err(ops::cross_entropy_soft(&t, &randn(&[3, 4], 1), &randn(&[3, 5], 2)), &["[3, 4]", "[3, 5]"]);
    expect_shape_err(ops::mse(&t, &randn(&[3, 4], 1), &randn(&[4, 3], 2)), &["[3, 4]", "[4, 3]"]);
    expect_shape_err(ops::concat_rows(&t, &[&randn(&[2, 3], 1), &randn(&[2, 4], 2)]), &["[2, 3]", "[2, 4]"]);
    expect_shape_err(ops::narrow_rows(&t, &randn(&[2, 3], 1), 1, 2), &["[2, 3]"]);
    expect_shape_err(ops::softmax(&t, &randn(&[2, 3, 4], 1)), &["[2, 3, 4]"]);
    expect_shape_err(muscle::Tensor::from_vec(vec![0.0; 5], &[2, 3]), &["[2, 3]"]);
    expect_shape_err(t.backward(&randn(&[2], 1)), &["[2]"]);
}

#[test]
fn a_model_rejects_the_wrong_image_size() {
    use muscle::nn::{ForwardCtx, Model, ModelKind, ModelSpec};
    let spec = ModelSpec { kind: ModelKind::ConvNet { width: 4 }, in_channels: 1, height: 28, width: 28, classes: 10 };
    let mut m = Model::new(spec, 0).expect("model");
    expect_shape_err(
        m.forward(&Tape::no_grad(), &randn(&[2, 3, 28, 28], 1), &ForwardCtx::eval()),
        &["[2, 3, 28, 28]", "1x28x28"],
    );
}

/// Every choice's word round-trips, and an unknown word gets the message users have seen.
#[test]
fn choices_keep_their_words_and_messages() {
    use muscle::app::bench_op::Op;
    use muscle::data::DatasetKind;
    use muscle::ssl::Method;
    use muscle::train::{OptimizerKind, ScheduleKind};
    fn check<T: std::str::FromStr<Err = muscle::Error> + std::fmt::Display>(words: &[&str], message: &str) {
        for w in words {
            assert_eq!(w.parse::<T>().ok().map(|v| v.to_string()).as_deref(), Some(*w));
        }
        let err = "x".parse::<T>().err().expect("x is no choice");
        assert_eq!((err.kind(), err.message()), (ErrorKind::Usage, message));
    }
    check::<OptimizerKind>(
        &["adam", "adamw", "sgd"],
        "--optimizer: unknown optimizer 'x' (expected adam, adamw or sgd)",
    );
    check::<ScheduleKind>(
        &["cosine", "constant", "fixmatch-cosine"],
        "--schedule: unknown schedule 'x' (expected cosine, constant or fixmatch-cosine)",
    );
    check::<Method>(
        &["supervised", "muscle", "mixmatch", "mixmatch-muscle", "fixmatch", "fixmatch-muscle", "pretrain"],
        "--method: unknown method 'x' (expected supervised, muscle, mixmatch, mixmatch-muscle, fixmatch, fixmatch-muscle)",
    );
    check::<DatasetKind>(
        &["fashion-mnist", "mnist", "cifar10", "cifar100", "folder"],
        "unknown --dataset 'x' (valid: fashion-mnist, mnist, cifar10, cifar100, folder)",
    );
    check::<muscle::nn::ModelKind>(
        &["convnet", "wrn-28-2", "cnn13"],
        "--model: unknown model 'x' (expected convnet, wrn-28-2 or cnn13)",
    );
    check::<Op>(&["mi", "softmax-ce", "conv", "gemm"], "--op: unknown op 'x' (expected mi, softmax-ce, conv or gemm)");
}
