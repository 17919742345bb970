"""Reports of discovered slices.

``contract`` defines the files a result directory holds (``summary.json``, ``slices*.csv``,
thumbnails) and writes and reads them; ``render`` turns such a directory into a
self-contained HTML page from the Jinja templates, stylesheet and script in ``templates/``;
``figures`` draws matplotlib figures and text tables of slices. The names below are the
facade: ``from harness.report import save_slice_table, write_reports``.
"""

from harness.report.contract import experiment_dirs, read_slice_table, save_slice_table, save_thumbnails
from harness.report.render import read_experiment, render_report, write_report, write_reports

__all__ = [
    "experiment_dirs",
    "read_experiment",
    "read_slice_table",
    "render_report",
    "save_slice_table",
    "save_thumbnails",
    "write_report",
    "write_reports",
]
