"""muscle.torch against torch autograd of the official IID_loss, gradcheck, a training loop, and
bad inputs. Skipped where torch is not installed."""

import math

import pytest

torch = pytest.importorskip("torch")
import muscle.torch as mt  # noqa: E402

EPS = torch.finfo(torch.float64).eps


def official_iid_loss(x_out, x_tf_out, lamb=1.0):
    """IID_loss from the IIC repository (Ji et al.), on logits: its inputs are softmax outputs."""
    x_out, x_tf_out = x_out.softmax(dim=1), x_tf_out.softmax(dim=1)
    _, k = x_out.size()
    p_i_j = (x_out.unsqueeze(2) * x_tf_out.unsqueeze(1)).sum(dim=0)
    p_i_j = (p_i_j + p_i_j.t()) / 2.0
    p_i_j = p_i_j / p_i_j.sum()
    p_i = p_i_j.sum(dim=1).view(k, 1).expand(k, k)
    p_j = p_i_j.sum(dim=0).view(1, k).expand(k, k)
    p_i_j = torch.where(p_i_j < EPS, torch.full_like(p_i_j, EPS), p_i_j)
    p_j = torch.where(p_j < EPS, torch.full_like(p_j, EPS), p_j)
    p_i = torch.where(p_i < EPS, torch.full_like(p_i, EPS), p_i)
    return -(p_i_j * (torch.log(p_i_j) - lamb * torch.log(p_j) - lamb * torch.log(p_i))).sum()


def pair(n, c, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(n, c, generator=g, dtype=dtype) * 2).requires_grad_()
    b = (torch.randn(n, c, generator=g, dtype=dtype) * 0.7).requires_grad_()
    return a, b


@pytest.mark.parametrize("n,c,lam", [(100, 10, 1.0), (33, 3, 2.0), (64, 50, 1.0)])
def test_value_and_gradients_match_torch_autograd_of_the_official_loss(n, c, lam):
    a, b = pair(n, c)
    want = official_iid_loss(a, b, lam)
    wa, wb = torch.autograd.grad(want, (a, b))
    got = mt.iic_loss(a, b, lam)
    ga, gb = torch.autograd.grad(got, (a, b))
    assert got.dtype == torch.float64 and got.dim() == 0
    assert got.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(ga, wa, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gb, wb, rtol=1e-9, atol=1e-12)
    # The views differ, so swapped gradients would fail above.
    assert (wa - wb).abs().max() > 1e-4


def test_float32_follows_float64():
    a, b = pair(4000, 10)
    want = mt.iic_loss(a, b)
    wa, wb = torch.autograd.grad(want, (a, b))
    a32, b32 = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    got = mt.iic_loss(a32, b32)
    ga, gb = torch.autograd.grad(got, (a32, b32))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)
    scale = max(wa.abs().max().item(), wb.abs().max().item())
    assert (ga.double() - wa).abs().max().item() < 1e-3 * scale
    assert (gb.double() - wb).abs().max().item() < 1e-3 * scale


def test_gradcheck():
    a, b = pair(12, 5, seed=3)
    assert torch.autograd.gradcheck(lambda x, y: mt.iic_loss(x, y, 1.3), (a, b), eps=1e-6, atol=1e-7)


def test_either_view_may_be_detached_and_the_upstream_gradient_scales():
    a, b = pair(50, 6, seed=4)
    (3.0 * mt.iic_loss(a, b.detach())).backward()
    assert b.grad is None
    want_a = torch.autograd.grad(3.0 * official_iid_loss(a, b.detach()), a)[0]
    torch.testing.assert_close(a.grad, want_a, rtol=1e-9, atol=1e-12)


def test_a_training_loop_follows_the_pure_torch_loss_curve():
    def curve(loss_fn):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(256, 16, generator=g)
        losses = []
        for _ in range(20):
            v1 = x + 0.1 * torch.randn(x.shape, generator=g)
            v2 = x + 0.1 * torch.randn(x.shape, generator=g)
            # Logits scaled up so that the first steps are not in the flat, near-uniform region.
            loss = loss_fn(5.0 * model(v1), 5.0 * model(v2))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    ours, theirs = curve(mt.iic_loss), curve(official_iid_loss)
    assert ours[-1] < ours[0] - 1.0, ours  # it learns
    for k, (o, t) in enumerate(zip(ours, theirs)):
        assert o == pytest.approx(t, rel=2e-4, abs=2e-5), f"step {k}: {o} vs {t}"


def test_cross_entropy_matches_torch():
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(40, 7, generator=g, dtype=dtype, requires_grad=True)
        y = torch.randint(0, 7, (40,), generator=g)
        got = mt.cross_entropy(x, labels=y)
        want = torch.nn.functional.cross_entropy(x, y)
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        assert got.item() == pytest.approx(want.item(), rel=tol)
        torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])
        q = torch.softmax(torch.randn(40, 7, generator=g, dtype=dtype), dim=1)
        got = mt.cross_entropy(x, targets=q)
        want = torch.nn.functional.cross_entropy(x, q)
        assert got.item() == pytest.approx(want.item(), rel=tol)
        torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


def test_bad_inputs_raise_clear_errors():
    a, b = pair(8, 3)
    with pytest.raises(TypeError, match="meta"):
        mt.iic_loss(torch.empty(8, 3, device="meta"), torch.empty(8, 3, device="meta"))
    with pytest.raises(TypeError, match="int64"):
        mt.iic_loss(torch.zeros(8, 3, dtype=torch.int64), torch.zeros(8, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="float32"):
        mt.iic_loss(a.float(), b)
    with pytest.raises(ValueError, match="same shape"):
        mt.iic_loss(a, b[:4])
    with pytest.raises(ValueError, match="lam"):
        mt.iic_loss(a, b, 0.0)
    with pytest.raises(ValueError, match=r"logits_a: row 2"):
        mt.iic_loss(a.detach().index_put((torch.tensor([2]), torch.tensor([1])), torch.tensor(math.nan, dtype=a.dtype)), b)
    with pytest.raises(TypeError, match="torch.Tensor"):
        mt.iic_loss([[0.0, 1.0]], b)
    with pytest.raises(ValueError, match="label"):
        mt.cross_entropy(a, labels=torch.tensor([0, 1, 2, 3, 0, 1, 2, 0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_raise_a_type_error_naming_the_device():
    x = torch.zeros(4, 3, device="cuda")
    with pytest.raises(TypeError, match="cuda:0"):
        mt.iic_loss(x, x)


def test_non_contiguous_tensors_give_the_same_result():
    a, b = pair(30, 4, seed=6)
    want = mt.iic_loss(a, b).item()
    at = a.detach().t().contiguous().t()  # column-major storage
    assert not at.is_contiguous()
    assert mt.iic_loss(at, b.detach()).item() == want
