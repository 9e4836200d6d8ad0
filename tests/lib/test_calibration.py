import numpy as np
import pytest

from tlflow.tasks.lib.probe import calibration


def _overconfident(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a 3-class model that is right 70% of the time but says ~99%: a calibrated
    model's logits times 4."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    z = rng.normal(0, 1, (n, 3))
    z[np.arange(n), y] += 1.5
    return 4.0 * z, y


def test_ece_is_zero_when_confidence_matches_accuracy():
    # two bins: confidence 0.75 and right 3 times in 4; confidence 1.0 and always right
    p = np.array([[0.75, 0.25]] * 4 + [[1.0, 0.0]] * 4)
    y = np.array([0, 0, 0, 1, 0, 0, 0, 0])
    assert calibration.expected_calibration_error(p, y) == pytest.approx(0.0)


def test_ece_measures_the_gap():
    p = np.array([[0.9, 0.1]] * 10)  # says 0.9, right half of the time
    y = np.array([0] * 5 + [1] * 5)
    assert calibration.expected_calibration_error(p, y) == pytest.approx(0.4)


def test_temperature_lowers_the_nll_and_the_ece_of_an_overconfident_model():
    z, y = _overconfident()
    t = calibration.fit_temperature(z, y)
    assert t > 2  # it softens: the logits were scaled up by 4
    assert calibration.nll(z, y, t) < calibration.nll(z, y) - 0.1
    held, y_held = _overconfident(seed=1)  # and it holds on other data of the same model
    before = calibration.expected_calibration_error(calibration.softmax(held), y_held)
    after = calibration.expected_calibration_error(calibration.softmax(held, t), y_held)
    assert after < before / 3, (before, after)
    # the predicted class never changes
    assert (calibration.softmax(held, t).argmax(1) == held.argmax(1)).all()


def test_logits_of_probabilities_give_the_same_softmax_at_any_temperature():
    z, _ = _overconfident(50)
    p = calibration.softmax(z)
    np.testing.assert_allclose(calibration.softmax(calibration.logits_of(p), 2.5),
                               calibration.softmax(z, 2.5), atol=1e-9)


def test_temperature_needs_data():
    with pytest.raises(ValueError, match="at least one"):
        calibration.fit_temperature(np.empty((0, 2)), np.empty(0, int))


def test_coverage_table():
    conf = np.array([0.55, 0.85, 0.92, 0.99])
    correct = np.array([False, True, False, True])
    rows = calibration.coverage_table(conf, correct, at=(0.5, 0.9, 0.995))
    assert [(r["coverage"], r["kept"], r["accuracy"]) for r in rows] == [
        (1.0, 4, 0.5), (0.5, 2, 0.5), (0.0, 0, None)]
