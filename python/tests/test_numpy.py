"""The NumPy API against independent references: the official IID_loss formula written in NumPy,
finite differences, `muscle mi`'s f64 reference (through the CLI), and bad inputs."""

import json
import subprocess

import numpy as np
import pytest

import muscle

EPS = np.finfo(np.float64).eps


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def official_iid_loss(a, b, lam=1.0):
    """IIC's IID_loss (Ji et al.), in NumPy f64: symmetrised joint, marginals, then the clamp."""
    p = softmax(a).T @ softmax(b)
    p = (p + p.T) / 2.0
    p = p / p.sum()
    pi = np.broadcast_to(p.sum(axis=1, keepdims=True), p.shape).copy()
    pj = np.broadcast_to(p.sum(axis=0, keepdims=True), p.shape).copy()
    p, pi, pj = (np.where(m < EPS, EPS, m) for m in (p, pi, pj))
    return float(-(p * (np.log(p) - lam * np.log(pj) - lam * np.log(pi))).sum())


def logits(n, c, seed, scale=2.0, dtype=np.float64):
    return (np.random.default_rng(seed).standard_normal((n, c)) * scale).astype(dtype)


def finite_differences(f, x, h=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (f(xp) - f(xm)) / (2 * h)
    return g


@pytest.mark.parametrize("n,c,lam", [(64, 10, 1.0), (257, 3, 1.5), (40, 100, 1.0)])
def test_the_loss_is_the_official_iid_loss(n, c, lam):
    a, b = logits(n, c, 1), logits(n, c, 2)
    want = official_iid_loss(a, b, lam)
    loss64, _, _ = muscle.iic_loss(a, b, lam)
    assert loss64 == pytest.approx(want, rel=1e-12, abs=1e-12)
    loss32, _, _ = muscle.iic_loss(a.astype(np.float32), b.astype(np.float32), lam)
    assert loss32 == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_gradients_are_the_finite_differences_of_each_view_not_swapped():
    a, b = logits(9, 4, 3), logits(9, 4, 4, scale=0.5)
    _, ga, gb = muscle.iic_loss(a, b, 1.2)
    fa = finite_differences(lambda x: official_iid_loss(x, b, 1.2), a)
    fb = finite_differences(lambda x: official_iid_loss(a, x, 1.2), b)
    np.testing.assert_allclose(ga, fa, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(gb, fb, rtol=1e-5, atol=1e-8)
    # The views differ, so swapped gradients would fail the checks above; make sure they differ.
    assert np.abs(fa - fb).max() > 1e-3


def test_float32_gradients_follow_the_float64_reference():
    a, b = logits(3000, 10, 5), logits(3000, 10, 6)
    _, ga, gb = muscle.iic_loss(a, b)
    _, ga32, gb32 = muscle.iic_loss(a.astype(np.float32), b.astype(np.float32))
    assert ga32.dtype == np.float32 and gb32.dtype == np.float32
    scale = max(np.abs(ga).max(), np.abs(gb).max())
    assert np.abs(ga32 - ga).max() < 1e-3 * scale
    assert np.abs(gb32 - gb).max() < 1e-3 * scale


def test_the_package_matches_muscle_mi_on_the_command_line(tmp_path, muscle_bin):
    a, b = logits(100, 7, 7), logits(100, 7, 8)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    out = subprocess.run(
        [muscle_bin, "mi", "--logits-a", str(tmp_path / "a.npy"), "--logits-b", str(tmp_path / "b.npy"),
         "--lambda", "1.3", "--out", str(tmp_path / "g.safetensors")],
        check=True, capture_output=True, text=True,
    )
    cli = json.loads(out.stdout)
    loss, ga, gb = muscle.iic_loss(a, b, 1.3)
    grads, meta = muscle.load_checkpoint(tmp_path / "g.safetensors")
    assert loss == cli["loss"]
    np.testing.assert_array_equal(ga, grads["grad_a"])
    np.testing.assert_array_equal(gb, grads["grad_b"])
    assert float(meta["lambda"]) == 1.3


def test_any_memory_layout_gives_the_same_result():
    a, b = logits(50, 6, 9, dtype=np.float32), logits(50, 6, 10, dtype=np.float32)
    want = muscle.iic_loss(a, b)
    for x, y in [(np.asfortranarray(a), np.asfortranarray(b)), (np.ascontiguousarray(a.T).T, b),
                 (np.repeat(a, 2, axis=0)[::2], np.repeat(b, 2, axis=0)[::2])]:
        got = muscle.iic_loss(x, y)
        assert got[0] == want[0]
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[2], want[2])


def test_the_same_array_for_both_views_is_allowed():
    a = logits(30, 5, 11)
    loss, ga, gb = muscle.iic_loss(a, a)
    assert loss == pytest.approx(official_iid_loss(a, a), rel=1e-12)
    np.testing.assert_allclose(ga, gb, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "a,b,lam,error,needle",
    [
        (np.zeros((4, 3), np.int32), np.zeros((4, 3), np.int32), 1.0, TypeError, "int32"),
        ([[0.0, 1.0]], [[0.0, 1.0]], 1.0, TypeError, "numpy.ndarray"),
        (np.zeros((4, 3), np.float32), np.zeros((4, 3), np.float64), 1.0, TypeError, "float32"),
        (np.zeros((4, 3)), np.zeros((5, 3)), 1.0, ValueError, "same shape"),
        (np.zeros(4), np.zeros(4), 1.0, ValueError, "(n, C)"),
        (np.zeros((4, 1)), np.zeros((4, 1)), 1.0, ValueError, "2 columns"),
        (np.zeros((0, 3)), np.zeros((0, 3)), 1.0, ValueError, "1 row"),
        (np.zeros((4, 3)), np.zeros((4, 3)), 0.0, ValueError, "lam"),
        (np.zeros((4, 3)), np.zeros((4, 3)), float("nan"), ValueError, "lam"),
        (np.zeros((4, 3)), np.zeros((4, 3)), "1", TypeError, "lam"),
    ],
)
def test_bad_inputs_raise_clear_errors(a, b, lam, error, needle):
    with pytest.raises(error, match=None) as e:
        muscle.iic_loss(a, b, lam)
    assert needle in str(e.value)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_logit_is_a_value_error_naming_the_row(dtype, bad):
    # Large enough for the parallel check's chunks; the bad value in the last chunk.
    a, b = logits(70000, 3, 12, dtype=dtype), logits(70000, 3, 13, dtype=dtype)
    b[69990, 1] = bad
    with pytest.raises(ValueError, match="logits_b: row 69990"):
        muscle.iic_loss(a, b)
    with pytest.raises(ValueError, match="logits: row 69990"):
        muscle.cross_entropy(b, labels=np.zeros(70000, np.int64))


def reference_cross_entropy(x, t):
    m = x.max(axis=1, keepdims=True)
    lse = m + np.log(np.exp(x - m).sum(axis=1, keepdims=True))
    return float(-(t * (x - lse)).sum(axis=1).mean())


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_cross_entropy_with_labels_and_targets(dtype, tol):
    x = logits(13, 5, 14, dtype=dtype)
    labels = np.arange(13) % 5
    t = np.eye(5)[labels]
    q = softmax(logits(13, 5, 15)).astype(dtype)
    for kw, target in [({"labels": labels}, t), ({"targets": q}, q)]:
        loss, grad = muscle.cross_entropy(x, **kw)
        assert grad.dtype == dtype
        assert loss == pytest.approx(reference_cross_entropy(x.astype(np.float64), target), rel=tol, abs=tol)
        fd = finite_differences(lambda v: reference_cross_entropy(v, target), x.astype(np.float64))
        np.testing.assert_allclose(grad, fd, rtol=1e-4 if dtype == np.float32 else 1e-6, atol=1e-6)


def test_cross_entropy_bad_inputs():
    x = logits(4, 3, 16)
    with pytest.raises(ValueError, match="row 2 has label 3"):
        muscle.cross_entropy(x, labels=np.array([0, 1, 3, 2]))
    with pytest.raises(ValueError, match="row 1 has label -1"):
        muscle.cross_entropy(x, labels=np.array([0, -1, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        muscle.cross_entropy(x, labels=np.zeros(4))
    with pytest.raises(ValueError, match="exactly one"):
        muscle.cross_entropy(x)
    with pytest.raises(ValueError, match="shape"):
        muscle.cross_entropy(x, labels=np.zeros(5, np.int64))
    with pytest.raises(TypeError, match="float32"):
        muscle.cross_entropy(x, targets=np.zeros((4, 3), np.float32))
