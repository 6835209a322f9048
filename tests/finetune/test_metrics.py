"""finetune.metrics against scikit-survival, lifelines, scikit-image, scipy and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import scipy.stats
from lifelines.utils import concordance_index as lifelines_concordance_index
from skimage import data as skimage_data
from skimage.color import hed2rgb, rgb2hed
from skimage.draw import disk
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sksurv.metrics import concordance_index_censored, concordance_index_ipcw
from sksurv.util import Surv

from common.errors import InputError
from finetune import metrics


def censored_survival(rng, n, censor_rate=0.3):
    """Continuous exponential times driven by a latent risk; random right-censoring."""
    latent_risk = rng.normal(size=n)
    event_time = rng.exponential(scale=np.exp(-latent_risk))
    censor_time = rng.exponential(scale=np.exp(-latent_risk).mean() / censor_rate * (1 - censor_rate), size=n)
    time = np.minimum(event_time, censor_time)
    event = event_time <= censor_time
    noisy_risk = latent_risk + rng.normal(scale=1.0, size=n)
    return time, event, noisy_risk


# ------------------------------------------------------------------ concordance


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_concordance_matches_sksurv_and_lifelines(seed):
    rng = np.random.default_rng(seed)
    time, event, risk = censored_survival(rng, 200)
    assert 0 < event.sum() < len(event)
    ours = metrics.concordance_index(time, event, risk)
    sksurv_value = concordance_index_censored(event, time, risk)[0]
    # lifelines scores predicted survival (higher = longer), so the risk is negated
    lifelines_value = lifelines_concordance_index(time, -risk, event)
    assert ours == pytest.approx(sksurv_value, abs=1e-12)
    assert ours == pytest.approx(lifelines_value, abs=1e-12)
    assert 0.55 < ours < 0.95  # informative but imperfect risk


def test_concordance_extremes_and_ties():
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([1, 1, 1, 0])
    assert metrics.concordance_index(time, event, -time) == 1.0
    assert metrics.concordance_index(time, event, time) == 0.0
    assert metrics.concordance_index(time, event, np.zeros(4)) == 0.5


def test_concordance_rejects_bad_input():
    with pytest.raises(InputError, match="risk"):
        metrics.concordance_index([1.0, 2.0], [1, 0], [0.1, 0.2, 0.3])
    with pytest.raises(InputError, match="time"):
        metrics.concordance_index([1.0, np.nan], [1, 0], [0.1, 0.2])
    with pytest.raises(InputError, match="event"):
        metrics.concordance_index([1.0, 2.0], [1, 2], [0.1, 0.2])
    with pytest.raises(InputError, match="comparable pair"):
        metrics.concordance_index([1.0, 2.0, 3.0], [0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(InputError, match="comparable pair"):  # two events at the same time
        metrics.concordance_index([2.0, 2.0], [1, 1], [0.1, 0.2])


@pytest.mark.parametrize("seed", [0, 1])
def test_ipcw_matches_sksurv_with_same_tau(seed):
    rng = np.random.default_rng(seed)
    train_time, train_event, _ = censored_survival(rng, 300)
    test_time, test_event, risk = censored_survival(rng, 150)
    tau = float(np.quantile(train_time, 0.8))
    expected = concordance_index_ipcw(
        Surv.from_arrays(train_event, train_time), Surv.from_arrays(test_event, test_time), risk, tau=tau
    )[0]
    ours = metrics.ipcw_concordance_index(train_time, train_event, test_time, test_event, risk, tau=tau)
    assert ours == pytest.approx(expected, abs=1e-12)
    # censoring weights change the value: it is not Harrell's in disguise
    assert ours != pytest.approx(metrics.concordance_index(test_time, test_event, risk), abs=1e-6)


def test_ipcw_default_tau_is_training_follow_up():
    rng = np.random.default_rng(3)
    train_time, train_event, _ = censored_survival(rng, 300)
    train_event[np.argmax(train_time)] = False  # censoring survival drops to zero at the end
    test_time, test_event, risk = censored_survival(rng, 150)
    test_time[0], test_event[0] = train_time.max() * 2, True  # event beyond training follow-up
    train_y = Surv.from_arrays(train_event, train_time)
    test_y = Surv.from_arrays(test_event, test_time)
    with pytest.raises(ValueError):  # what scikit-survival does without truncation
        concordance_index_ipcw(train_y, test_y, risk)
    expected = concordance_index_ipcw(train_y, test_y, risk, tau=train_time.max())[0]
    assert metrics.ipcw_concordance_index(train_time, train_event, test_time, test_event, risk) == pytest.approx(
        expected, abs=1e-12
    )
    # a tau beyond follow-up is capped, not an error
    assert metrics.ipcw_concordance_index(
        train_time, train_event, test_time, test_event, risk, tau=train_time.max() * 10
    ) == pytest.approx(expected, abs=1e-12)


def test_ipcw_without_censoring_equals_harrell():
    rng = np.random.default_rng(4)
    time = rng.exponential(size=120)
    event = np.ones(120, dtype=bool)
    risk = -time + rng.normal(scale=0.5, size=120)
    uno = metrics.ipcw_concordance_index(time, event, time, event, risk)
    assert uno == pytest.approx(metrics.concordance_index(time, event, risk), abs=1e-9)


def test_ipcw_rejects_bad_tau_and_lengths():
    time = np.array([1.0, 2.0, 3.0])
    event = np.array([True, True, False])
    with pytest.raises(InputError, match="tau"):
        metrics.ipcw_concordance_index(time, event, time, event, [0.3, 0.2, 0.1], tau=-1)
    with pytest.raises(InputError, match="risk"):
        metrics.ipcw_concordance_index(time, event, time, event, [0.3, 0.2])
    with pytest.raises(InputError, match="comparable pair"):
        metrics.ipcw_concordance_index(time, event, time, event, [0.3, 0.2, 0.1], tau=0.5)


# ------------------------------------------------------------------ PSNR / SSIM


@pytest.fixture(scope="module")
def image_pairs():
    rng = np.random.default_rng(5)
    grey = skimage_data.camera()[::4, ::4].astype(np.float64) / 255.0  # 128×128, [0, 1]
    rgb = skimage_data.astronaut()[::4, ::4].astype(np.float64)  # 128×128×3, [0, 255]
    return [
        (np.clip(grey + rng.normal(scale=0.05, size=grey.shape), 0, 1), grey, 1.0),
        (np.clip(rgb + rng.normal(scale=12.0, size=rgb.shape), 0, 255), rgb, 255.0),
    ]


def test_psnr_matches_formula_and_skimage(image_pairs):
    for pred, target, data_range in image_pairs:
        mse = np.mean((pred - target) ** 2)
        by_hand = 10 * np.log10(data_range**2 / mse)
        ours = metrics.psnr(pred, target, data_range)
        assert ours == pytest.approx(by_hand, rel=1e-12)
        assert ours == pytest.approx(peak_signal_noise_ratio(target, pred, data_range=data_range), rel=1e-12)
    _, target, data_range = image_pairs[0]
    assert metrics.psnr(target, target, data_range) == float("inf")


def test_ssim_matches_skimage(image_pairs):
    (grey_pred, grey, grey_range), (rgb_pred, rgb, rgb_range) = image_pairs
    assert metrics.ssim(grey_pred, grey, grey_range) == pytest.approx(
        structural_similarity(grey, grey_pred, data_range=grey_range), rel=1e-12
    )
    # channels last: the mean of the per-channel SSIMs
    per_channel = [structural_similarity(rgb[..., c], rgb_pred[..., c], data_range=rgb_range) for c in range(3)]
    assert metrics.ssim(rgb_pred, rgb, rgb_range) == pytest.approx(np.mean(per_channel), rel=1e-12)
    assert metrics.ssim(rgb, rgb, rgb_range) == pytest.approx(1.0)
    assert metrics.ssim(rgb_pred, rgb, rgb_range) < 0.95


def test_image_metrics_reject_bad_input(image_pairs):
    pred, target, _ = image_pairs[0]
    with pytest.raises(InputError, match="data_range"):
        metrics.psnr(pred, target, None)
    with pytest.raises(InputError, match="target"):
        metrics.ssim(pred, target[:-1], 1.0)


# ------------------------------------------------------------------ H-score


@pytest.fixture(scope="module")
def ihc_image():
    return skimage_data.immunohistochemistry()  # bundled with scikit-image (ihc.png), no download


def hand_h_score(rgb, nuclei, thresholds):
    """Direct computation, one nucleus at a time."""
    dab = rgb2hed(rgb)[..., 2]
    classes = []
    for label in np.unique(nuclei[nuclei > 0]):
        value = dab[nuclei == label].mean()
        classes.append(sum(value >= t for t in thresholds))
    classes = np.array(classes)
    pct = [100.0 * np.mean(classes == k) for k in range(4)]
    return pct[1] + 2 * pct[2] + 3 * pct[3], pct, len(classes)


def test_h_score_matches_direct_computation_on_real_ihc(ihc_image):
    # a supplied instance mask: discs on a grid, labels deliberately non-sequential
    nuclei = np.zeros(ihc_image.shape[:2], dtype=np.int32)
    for k, (r, c) in enumerate((r, c) for r in range(16, 512, 32) for c in range(16, 512, 32)):
        nuclei[disk((r, c), 7, shape=nuclei.shape)] = 3 * k + 5
    thresholds = (0.03, 0.06, 0.1)
    result = metrics.h_score(ihc_image, nuclei, thresholds=thresholds)
    expected_score, expected_pct, n = hand_h_score(ihc_image, nuclei, thresholds)
    assert result["n_nuclei"] == n == 256
    assert result["h_score"] == pytest.approx(expected_score, abs=1e-9)
    for key, pct in zip(("pct_negative", "pct_weak", "pct_moderate", "pct_strong"), expected_pct):
        assert result[key] == pytest.approx(pct, abs=1e-9)
    assert sum(result[k] for k in ("n_negative", "n_weak", "n_moderate", "n_strong")) == n
    # the image mixes stained epithelium and unstained stroma: every class should be present
    assert all(result[k] > 0 for k in ("n_negative", "n_weak", "n_moderate", "n_strong"))


def test_h_score_segmentation_path_on_real_ihc(ihc_image):
    result = metrics.h_score(ihc_image)
    assert result["n_nuclei"] > 50
    assert 0.0 <= result["h_score"] <= 300.0
    labels = metrics.segment_nuclei(ihc_image)
    assert labels.max() == result["n_nuclei"]
    assert labels.shape == ihc_image.shape[:2]


def synthetic_ihc(dab_amount, n_side=5, radius_px=8, size_px=160):
    """hed2rgb image: hematoxylin-stained discs carrying `dab_amount` of DAB, and their labels."""
    hed = np.zeros((size_px, size_px, 3))
    nuclei = np.zeros((size_px, size_px), dtype=np.int32)
    centres = np.linspace(20, size_px - 20, n_side).astype(int)
    for k, (r, c) in enumerate((r, c) for r in centres for c in centres):
        rr, cc = disk((r, c), radius_px, shape=nuclei.shape)
        hed[rr, cc, 0] = 0.08
        hed[rr, cc, 2] = dab_amount
        nuclei[rr, cc] = k + 1
    rgb = (np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8)
    return rgb, nuclei


@pytest.mark.parametrize("use_given_mask", [True, False])
def test_h_score_synthetic_strong_and_unstained(use_given_mask):
    strong_rgb, nuclei = synthetic_ihc(dab_amount=0.3)
    unstained_rgb, _ = synthetic_ihc(dab_amount=0.0)
    mask = nuclei if use_given_mask else None
    strong = metrics.h_score(strong_rgb, mask)
    unstained = metrics.h_score(unstained_rgb, mask)
    assert strong["n_nuclei"] == unstained["n_nuclei"] == 25
    assert strong["h_score"] == pytest.approx(300.0)
    assert unstained["h_score"] == pytest.approx(0.0)
    assert unstained["pct_negative"] == pytest.approx(100.0)


def test_h_score_rejects_bad_input(ihc_image):
    with pytest.raises(InputError, match="nuclei"):
        metrics.h_score(ihc_image, np.zeros(ihc_image.shape[:2], dtype=np.int32))
    with pytest.raises(InputError, match="nuclei"):
        metrics.h_score(ihc_image, np.ones((10, 10), dtype=np.int32))
    with pytest.raises(InputError, match="thresholds"):
        metrics.h_score(ihc_image, thresholds=(0.1, 0.05, 0.2))
    with pytest.raises(InputError, match="ihc_rgb"):
        metrics.h_score(ihc_image[..., 0])
    with pytest.raises(InputError, match="segmented nuclei"):  # blank slide: nothing to score
        metrics.h_score(np.full((64, 64, 3), 255, dtype=np.uint8))


# ------------------------------------------------------------------ per-gene Pearson


def test_pearson_per_gene_matches_scipy():
    rng = np.random.default_rng(6)
    true = rng.poisson(3.0, size=(80, 12)).astype(float)
    pred = true * rng.uniform(-1, 1, size=12) + rng.normal(scale=2.0, size=true.shape)
    pred[:, 4] = 2.5  # constant prediction
    true[:, 7] = 0.0  # gene never detected
    ours = metrics.pearson_per_gene(pred, scipy.sparse.csr_matrix(true))
    assert ours.shape == (12,)
    for gene in range(12):
        if gene in (4, 7):
            assert np.isnan(ours[gene])
        else:
            assert ours[gene] == pytest.approx(scipy.stats.pearsonr(pred[:, gene], true[:, gene])[0], abs=1e-12)
    defined = [g for g in range(12) if g not in (4, 7)]
    assert metrics.mean_pearson(pred, true) == pytest.approx(ours[defined].mean(), abs=1e-12)


def test_pearson_rejects_mismatched_shapes():
    with pytest.raises(InputError, match="true"):
        metrics.pearson_per_gene(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(InputError, match="pred"):
        metrics.pearson_per_gene(np.zeros(5), np.zeros(5))
