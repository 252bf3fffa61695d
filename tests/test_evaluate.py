import numpy as np
import pytest
import torch
from torch import nn

from vitrepro.data import ImageArrays
from vitrepro.evaluate import Accuracy, FewShot, accuracy, features, fewshot_lsr, fewshot_lsr_fit, make_evaluator


def _reference(x, y, xt, k, lam):
    """Independent solution: least squares on the augmented ridge system [X; sqrt(lam) I] w = [T; 0]."""
    mean, std = x.mean(0), x.std(0) + 1e-5
    aug = lambda a: np.hstack([(a - mean) / std, np.full((len(a), 1), 100.0)])  # noqa: E731
    xa = aug(x)
    t = 2 * np.eye(k)[y] - 1
    A = np.vstack([xa, np.sqrt(lam) * np.eye(xa.shape[1])])
    B = np.vstack([t, np.zeros((xa.shape[1], k))])
    w = np.linalg.lstsq(A, B, rcond=None)[0]
    return w, (aug(xt) @ w).argmax(1)


@pytest.mark.parametrize("n,d", [(50, 8), (12, 40)])  # N >= D (XᵀX) and N < D (XXᵀ)
def test_fewshot_lsr_matches_lstsq(n, d):
    rng = np.random.default_rng(n)
    k = 4
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d) + rng.normal(size=d)
    y = np.arange(n) % k
    xt = rng.normal(size=(30, d))
    yt = np.arange(30) % k
    for lam in (2.0 ** 10, 1.0):
        w, mean, std = fewshot_lsr_fit(x, y, k, lam)
        w_ref, pred_ref = _reference(x, y, xt, k, lam)
        np.testing.assert_allclose(w, w_ref, atol=1e-5, rtol=1e-5)
        acc, pred = fewshot_lsr(x, y, xt, yt, k, lam, return_predictions=True)
        np.testing.assert_array_equal(pred, pred_ref)
        assert acc == pytest.approx((pred_ref == yt).mean())


class _Toy(nn.Module):
    img_size, in_chans, num_classes, num_features = 4, 1, 2, 16

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 2)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.weight[1, 0] = 1.0
            self.head.bias.zero_()

    def forward_features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return self.head(self.forward_features(x))


def _toy_arrays(n=40):
    labels = torch.arange(n) % 2
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.where(labels == 1, 255, 0).to(torch.uint8)
    images[:, 0, 1:, :] = torch.randint(0, 256, (n, 3, 4), generator=torch.Generator().manual_seed(0),
                                        dtype=torch.uint8)
    return ImageArrays(images, labels, ["neg", "pos"], "toy")


def test_accuracy_features_fewshot_on_toy():
    m, a = _Toy(), _toy_arrays()
    assert features(m, a, batch_size=7).shape == (40, 16)
    assert accuracy(m, a, batch_size=7) == 1.0
    ev = Accuracy("toy", "test", arrays=a)
    assert ev(m) == {"acc/toy/test": 1.0}


def test_fewshot_evaluator_digits():
    torch.manual_seed(0)
    m = nn.Sequential()
    m.img_size, m.in_chans = 8, 1
    m.forward_features = lambda x: x.flatten(1)  # raw pixels as features
    ev = FewShot("digits", shots=(1, 10), seeds=(0, 1))
    out = ev(m)
    assert set(out) == {"fewshot/digits/1shot", "fewshot/digits/10shot", "fewshot/digits/1shot/seed0",
                        "fewshot/digits/1shot/seed1", "fewshot/digits/10shot/seed0", "fewshot/digits/10shot/seed1"}
    assert out["fewshot/digits/10shot"] > 0.8 and out["fewshot/digits/1shot"] > 0.3
    assert isinstance(make_evaluator({"type": "fewshot", "dataset": "digits", "shots": [5]}), FewShot)
    with pytest.raises(ValueError):
        make_evaluator({"type": "nope"})


def test_streamed_fewshot_scores_exactly_max_test_images(monkeypatch):
    """The streaming probe (imagenet-1k's path, here on local MNIST) scores the first ``max_test`` test images,
    also when they are fewer than a batch: it stopped at about half, counting the pending batch twice."""
    import vitrepro.evaluate as ev

    scored = []
    lsr = ev.fewshot_lsr
    monkeypatch.setattr(ev, "is_streamed", lambda name: True)
    monkeypatch.setattr(ev, "fewshot_lsr", lambda x, y, xt, yt, *a: scored.append(len(yt)) or lsr(x, y, xt, yt, *a))
    m = nn.Sequential()
    m.img_size, m.in_chans = 28, 1
    m.forward_features = lambda x: x.flatten(1)  # raw pixels as features
    for max_test in (10, 100):  # below and above the batch size
        scored.clear()
        FewShot("mnist", shots=(1,), seeds=(0,), batch_size=64, max_test=max_test)(m)
        assert scored == [max_test]
