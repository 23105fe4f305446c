import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda

from gradients import rel_err
from ptx import assert_compiles_to_ptx
from tinyfrcnn import losses
from tinyfrcnn.device import is_device_array
from tinyfrcnn.gradcheck import numerical_gradient
from tinyfrcnn.losses import smooth_l1, softmax_cross_entropy


# ---------------------------------------------------------------- cross-entropy


def test_cross_entropy_hand_worked():
    # logits (0, ln 3): softmax = (1/4, 3/4); label 1 -> -ln(3/4); label 0 -> -ln(1/4)
    logits = np.array([[0.0, np.log(3.0)], [0.0, np.log(3.0)], [5.0, 1.0]])
    labels = np.array([1, 0, -1])
    loss, grad = softmax_cross_entropy(logits, labels)
    assert loss == pytest.approx((-np.log(0.75) - np.log(0.25)) / 2, rel=1e-12)
    np.testing.assert_allclose(grad, [[0.125, -0.125], [-0.375, 0.375], [0.0, 0.0]], atol=1e-12)


def test_cross_entropy_one_kept_row_is_not_averaged_further():
    # one row kept: the mean is that row's -ln(3/4), the gradient softmax - one-hot itself
    logits = np.array([[0.0, np.log(3.0)], [5.0, 1.0]])
    loss, grad = softmax_cross_entropy(logits, np.array([1, -1]))
    assert loss == pytest.approx(-np.log(0.75), rel=1e-12)
    np.testing.assert_allclose(grad, [[0.25, -0.25], [0.0, 0.0]], atol=1e-12)


def test_cross_entropy_matches_reference_and_gradcheck():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 4)) * 3
    labels = np.array([0, 3, -1, 2, 1, -1, 3])
    loss, grad = softmax_cross_entropy(logits, labels)
    ref_loss, ref_grad = losses._softmax_cross_entropy_reference(logits, labels)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-15)
    num = numerical_gradient(lambda z: softmax_cross_entropy(z, labels)[0], logits.copy())
    assert rel_err(grad, num) < 1e-6


def test_cross_entropy_other_ignore_index_and_float32():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 3)).astype(np.float32)
    labels = np.array([0, 2, 7, 1, 7, 2])
    loss, grad = softmax_cross_entropy(logits, labels, ignore_index=7)
    ref_loss, ref_grad = losses._softmax_cross_entropy_reference(logits, labels, ignore_index=7)
    assert grad.dtype == np.float32
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert np.all(grad[[2, 4]] == 0)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0], [-1000.0, 1000.0]])
    loss, grad = softmax_cross_entropy(logits, np.array([1, 1]))
    assert loss == pytest.approx(500.0)
    np.testing.assert_allclose(grad, [[0.5, -0.5], [0.0, 0.0]], atol=1e-12)


def test_cross_entropy_all_ignored_and_empty():
    loss, grad = softmax_cross_entropy(np.ones((3, 2)), np.array([-1, -1, -1]))
    assert loss == 0.0 and np.all(grad == 0) and grad.shape == (3, 2)
    loss, grad = softmax_cross_entropy(np.zeros((0, 2)), np.zeros(0, np.int64))
    assert loss == 0.0 and grad.shape == (0, 2)
    loss, grad = softmax_cross_entropy(np.zeros((0, 2)), [])  # an empty list has no dtype
    assert loss == 0.0 and grad.shape == (0, 2)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_cross_entropy_properties(n, k, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 10
    labels = rng.integers(-1, k, size=n)
    loss, grad = softmax_cross_entropy(logits, labels)
    assert loss >= 0
    np.testing.assert_allclose(grad.sum(axis=1), 0, atol=1e-12)  # softmax - one-hot sums to 0
    # adding a constant to a row changes nothing
    loss2, grad2 = softmax_cross_entropy(logits + rng.normal(size=(n, 1)) * 50, labels)
    assert loss2 == pytest.approx(loss, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(grad2, grad, atol=1e-9)


@pytest.mark.parametrize(
    "logits, labels, match",
    [
        (np.zeros((3, 2)), np.array([0, 1]), "rows"),
        (np.zeros((2, 2)), np.array([0, 2]), "outside"),
        (np.zeros((2, 2)), np.array([0, -2]), "outside"),
        (np.zeros((2, 2), np.int64), np.array([0, 1]), "float"),
        (np.array([[0.0, np.nan], [0, 0]]), np.array([0, 1]), "NaN"),
        (np.zeros((2, 2)), np.array([0.0, 1.0]), "integer"),
        (np.zeros(4), np.array([0, 1, 0, 1]), "2-D"),
        (np.zeros((2, 0)), np.array([-1, -1]), "logits must have at least one class column"),
    ],
)
def test_cross_entropy_bad_input(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        softmax_cross_entropy(logits, labels)


@pytest.mark.parametrize("ignore_index", [2**64, -2**63 - 1, 1.0, True])
def test_cross_entropy_bad_ignore_index(ignore_index):
    with pytest.raises(ValueError, match="ignore_index must be an integer that fits int64"):
        softmax_cross_entropy(np.zeros((2, 2)), np.array([0, 1]), ignore_index=ignore_index)


# ---------------------------------------------------------------- smooth L1


def test_smooth_l1_hand_worked():
    pred = np.array([0.5, -0.5, 2.0, -3.0, 1.0])
    target = np.zeros(5)
    # beta 1: 0.125, 0.125, 1.5, 2.5, 0.5 (kink: |x| = beta takes the linear piece, same value)
    loss, grad = smooth_l1(pred, target)
    assert loss == pytest.approx(0.125 + 0.125 + 1.5 + 2.5 + 0.5)
    np.testing.assert_allclose(grad, [0.5, -0.5, 1.0, -1.0, 1.0])
    # beta 1/9 (sigma 3): 0.5 is linear -> 0.5 - 1/18
    loss, grad = smooth_l1(np.array([0.5, 0.1]), np.zeros(2), beta=1 / 9)
    assert loss == pytest.approx(0.5 - 1 / 18 + 0.5 * 0.01 * 9)
    np.testing.assert_allclose(grad, [1.0, 0.9])


def test_smooth_l1_beta_zero_is_l1():
    # beta = 0: |x|, whose slope at x = 0 is sign(0) = 0 (torch's L1 gradient there)
    pred = np.array([1.5, -2.0, 0.25, 0.0])
    target = np.array([0.0, 0.0, 0.25, 0.0])
    loss, grad = smooth_l1(pred, target, beta=0.0)
    assert loss == 3.5
    np.testing.assert_array_equal(grad, [1.0, -1.0, 0.0, 0.0])


def test_smooth_l1_weights_and_reference():
    rng = np.random.default_rng(2)
    pred, target = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    weights = rng.uniform(0, 2, size=(6, 4))
    for beta in (1.0, 1 / 9, 0.0):
        loss, grad = smooth_l1(pred, target, beta=beta, weights=weights)
        ref_loss, ref_grad = losses._smooth_l1_reference(pred, target, beta, weights)
        assert loss == pytest.approx(ref_loss, rel=1e-12)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-12)
    weights[:3] = 0
    loss_half, grad_half = smooth_l1(pred, target, weights=weights)
    assert np.all(grad_half[:3] == 0)
    assert loss_half == pytest.approx(smooth_l1(pred[3:], target[3:], weights=weights[3:])[0])


@pytest.mark.parametrize("beta", [1.0, 1 / 9])
def test_smooth_l1_gradcheck_including_near_the_kink(beta):
    rng = np.random.default_rng(3)
    target = rng.normal(size=12)
    offsets = np.array([0.3, -0.2, 2.0, -1.5, 0.0, 0.05])
    # points just inside and just outside |x| = beta (a step of 1e-6 does not cross it)
    near = np.array([beta - 1e-4, -(beta - 1e-4), beta + 1e-4, -(beta + 1e-4), beta - 3e-5, beta + 3e-5])
    pred = target + np.concatenate([offsets, near])
    weights = rng.uniform(0.5, 2, size=12)
    loss, grad = smooth_l1(pred, target, beta=beta, weights=weights)
    num = numerical_gradient(lambda p: smooth_l1(p, target, beta=beta, weights=weights)[0], pred.copy())
    assert rel_err(grad, num) < 1e-6


def test_smooth_l1_is_continuous_and_smooth_at_the_kink():
    beta = 0.5
    for side in (1.0, -1.0):
        x = side * np.array([beta - 1e-9, beta, beta + 1e-9])
        loss = [smooth_l1(np.array([v]), np.zeros(1), beta=beta)[0] for v in x]
        grads = [smooth_l1(np.array([v]), np.zeros(1), beta=beta)[1][0] for v in x]
        assert max(loss) - min(loss) < 1e-8
        np.testing.assert_allclose(grads, side, atol=1e-8)


def test_smooth_l1_float32_and_empty():
    pred = np.array([[0.2, -4.0]], np.float32)
    loss, grad = smooth_l1(pred, np.zeros_like(pred))
    assert grad.dtype == np.float32 and loss == pytest.approx(0.02 + 3.5, rel=1e-6)
    loss, grad = smooth_l1(np.zeros((0, 4)), np.zeros((0, 4)))
    assert loss == 0.0 and grad.shape == (0, 4)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 20), st.floats(0.01, 3.0), st.integers(0, 2**31 - 1))
def test_smooth_l1_properties(n, beta, seed):
    rng = np.random.default_rng(seed)
    pred, target = rng.normal(size=n) * 3, rng.normal(size=n) * 3
    loss, grad = smooth_l1(pred, target, beta=beta)
    x = np.abs(pred - target)
    # between the L1 loss shifted by beta/2 and the L1 loss; symmetric in pred and target
    assert (x - 0.5 * beta).sum() - 1e-9 <= loss <= x.sum() + 1e-9
    assert np.all(np.abs(grad) <= 1 + 1e-12)
    assert smooth_l1(target, pred, beta=beta)[0] == pytest.approx(loss, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pred=np.zeros(3), target=np.zeros(4)), "shape"),
        (dict(pred=np.zeros(3), target=np.zeros(3), weights=np.ones(2)), "shape"),
        (dict(pred=np.zeros(3), target=np.zeros(3, np.float32)), "dtype"),
        (dict(pred=np.zeros(3, np.int64), target=np.zeros(3, np.int64)), "float"),
        (dict(pred=np.array([0.0, np.inf]), target=np.zeros(2)), "NaN or inf"),
        (dict(pred=np.zeros(2), target=np.array([np.nan, 0])), "target"),
        (dict(pred=np.zeros(2), target=np.zeros(2), beta=-1.0), "beta"),
        (dict(pred=np.zeros(3), target=np.zeros(3), weights=np.ones(3, np.float32)),
         "smooth_l1: weights has dtype float32 but pred has float64"),
        (dict(pred=np.zeros(2), target=np.zeros(2), weights=np.array([1.0, np.nan])), "smooth_l1: weights holds NaN"),
    ],
)
def test_smooth_l1_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        smooth_l1(**kwargs)


# ---------------------------------------------------------------- CUDA


def test_cuda_kernels_match_reference_in_simulator():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(40, 3))
    labels = rng.integers(-1, 3, size=40)
    loss, grad = softmax_cross_entropy(cuda.to_device(logits), cuda.to_device(labels))
    ref_loss, ref_grad = losses._softmax_cross_entropy_reference(logits, labels)
    assert is_device_array(grad)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(grad.copy_to_host(), ref_grad, rtol=1e-12, atol=1e-15)

    pred, target = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
    weights = rng.uniform(size=(10, 4))
    d = [cuda.to_device(a) for a in (pred, target, weights)]
    loss, grad = smooth_l1(d[0], d[1], beta=1 / 9, weights=d[2])
    ref_loss, ref_grad = losses._smooth_l1_reference(pred, target, 1 / 9, weights)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(grad.copy_to_host(), ref_grad, rtol=1e-12)
    loss, grad = smooth_l1(d[0], d[1])
    assert loss == pytest.approx(losses._smooth_l1_reference(pred, target)[0], rel=1e-12)

    with pytest.raises(ValueError, match="device arrays"):
        smooth_l1(d[0], target)


def test_cuda_kernels_compile_to_ptx():
    assert_compiles_to_ptx([
        ("tinyfrcnn.losses", "_softmax_cross_entropy_cuda",
         "(float32[:, :], int64[:], int64, float64, float64[:], float32[:, :])"),
        ("tinyfrcnn.losses", "_smooth_l1_cuda",
         "(float32[:], float32[:], float32[:], boolean, float64, float64[:], float32[:])"),
    ])
