"""Progress on long work: plain lines with rate and ETA when the output is not a terminal."""

from tasks.lib.progress import Progress


def test_plain_lines_report_counts_rate_and_eta(capsys):
    progress = Progress("extract", 10, every_s=0.0)
    progress.advance(4)
    progress.advance(6)
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("extract: 4/10, ") and "ETA" in lines[0]
    assert lines[-1].startswith("extract: 10/10, ") and lines[-1].endswith("ETA 0 s")
