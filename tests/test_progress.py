"""Progress that a log can read: plain lines every interval when output is not a terminal."""

import io

from rich.console import Console

from eat.progress import LogProgress, make_progress


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_log_progress_prints_a_line_per_interval_and_one_at_the_end():
    lines, clock = [], FakeClock()
    with LogProgress(lines.append, interval=30, clock=clock) as bar:
        task = bar.add_task("timing sst2", total=400, info="")
        for done in range(1, 401):
            clock.now = done * 0.25  # 4 rows/s: 100 s for the stage
            bar.update(task, completed=done)
    # 100 s at one line per 30 s: after 30, 60, 90 s, then the finished line
    assert len(lines) == 4, lines
    assert lines[0] == "[progress] timing sst2: 120/400 (30%), 4/s, ETA 1m10s"
    assert lines[-1].startswith("[progress] timing sst2: 400/400 (100%), 4/s, elapsed 1m40s")


def test_log_progress_reports_a_stage_cut_short_and_unknown_totals():
    lines, clock = [], FakeClock()
    with LogProgress(lines.append, interval=30, clock=clock) as bar:
        task = bar.add_task("train sst2 eat", total=None, info="")
        clock.now = 10
        bar.update(task, completed=5, info="loss 0.5")
    assert lines == ["[progress] train sst2 eat: 5, 0.5/s, elapsed 10s, loss 0.5"]


def test_make_progress_picks_plain_lines_for_a_file_and_live_bars_for_a_terminal():
    assert isinstance(make_progress(Console(file=io.StringIO())), LogProgress)
    assert not isinstance(make_progress(Console(file=io.StringIO(), force_terminal=True)), LogProgress)
