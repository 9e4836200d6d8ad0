"""Progress on long work: plain lines with rate and ETA on stderr when it is not a terminal."""

from tlflow.tasks.lib.core.progress import MovingRate, Progress


def test_plain_lines_report_counts_rate_and_eta(capsys):
    progress = Progress("extract", 10, every_s=0.0)
    progress.advance(4)
    progress.advance(6)
    progress.close()
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == ""  # messages, never data
    assert lines[0].startswith("extract: 4/10, ") and lines[0].endswith("ETA ? s")
    assert lines[-1].startswith("extract: 10/10, ") and lines[-1].endswith("ETA 0 s")


def test_the_rate_is_measured_over_recent_updates_not_the_first_batch():
    rate = MovingRate(window_s=10.0)
    assert rate.add(0.0, 32) is None  # one batch: no rate yet (its time is warm-up)
    assert rate.add(1.0, 64) == 32.0  # the second batch measures the first rate
    for t in range(2, 30):  # the pace drops to 8/s, sustained
        rate.add(float(t), 64 + 8 * (t - 1))
    assert abs(rate.add(30.0, 64 + 8 * 29) - 8.0) < 1e-9  # the old pace has left the window
