"""The survey benchmark's parts: the photos it makes, the kill, and what it counts after the resume."""

from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd
import pytest

from wpcrack.diagnostics import survey_bench as sb
from wpcrack.errors import WpcrackError
from wpcrack.io import read_image, write_image


def test_photos_repeat_the_sources_turned_and_enlarge_a_share(tmp_path):
    sources = []
    y, x = np.mgrid[0:20, 0:30]
    for i in range(3):  # smooth ramps: JPEG keeps them
        sources.append(tmp_path / "src" / f"{i}.png")
        write_image(sources[-1], np.stack([y * 12, x * 8, np.full_like(x, 40 * i)], axis=-1).astype(np.uint8))
    made = sb.make_photos(sources, tmp_path / "photos", 7, large_every=3, large_pixels=2400)
    assert made == {"photos": 7, "large": 2, "native": 5, "sources": 3}
    shapes = [read_image(tmp_path / "photos" / f"{i:05d}.jpg").shape[:2] for i in range(7)]
    assert shapes[2] == shapes[5] == (40, 60) and all(s == (20, 30) for i, s in enumerate(shapes) if i not in (2, 5))
    first, repeat = (read_image(tmp_path / "photos" / f"{i:05d}.jpg").astype(int) for i in (0, 3))
    assert np.abs(first[:, ::-1] - repeat).mean() < 3 < np.abs(first - repeat).mean()  # the repeat: mirrored


def test_a_command_is_killed_with_its_children_once_half_the_rows_exist(tmp_path):
    rows = tmp_path / "rows"
    child = tmp_path / "child-alive"
    script = (f"import pathlib, subprocess, sys, time\n"
              f"subprocess.Popen([sys.executable, '-c', 'import time, pathlib\\nwhile True: "
              f"pathlib.Path(r\"{child}\").touch(); time.sleep(0.1)'])\n"
              f"r = pathlib.Path(r'{rows}'); r.mkdir()\n"
              "for i in range(100):\n    (r / f'{i}.json').write_text('{}'); time.sleep(0.05)\n")
    done = sb.kill_halfway([sys.executable, "-c", script], rows, 20, tmp_path / "log", poll_s=0.05)
    assert 10 <= done < 100
    time.sleep(0.5)
    stamp = child.stat().st_mtime_ns
    time.sleep(0.5)
    assert child.stat().st_mtime_ns == stamp  # the child was killed too (process group)
    with pytest.raises(WpcrackError, match="finished before half"):
        sb.kill_halfway([sys.executable, "-c", "pass"], rows / "none", 20, tmp_path / "log2", poll_s=0.05)


def test_resume_counts_rows_written_again_and_photos_without_a_row(tmp_path):
    rows = tmp_path / "out" / "rows"
    rows.mkdir(parents=True)
    for i in range(4):
        (rows / f"{i}.json").write_text("{}")
    before = sb.row_stamps(rows)
    time.sleep(0.01)
    (rows / "2.json").write_text('{"again": 1}')  # written again by the resumed run
    (rows / "4.json").write_text("{}")
    pd.DataFrame({"path": [f"/p/{i}.jpg" for i in range(5)]}).to_parquet(tmp_path / "out" / "survey.parquet")
    assert sb.resume_check(before, tmp_path / "out", 6) == {"processed_twice": 1, "missing": 1}


def test_the_figures_keep_exactly_the_benchmark_keys(tmp_path):
    figures = {"photos": 1000, "predict_photos_per_s": 1.0, "flow_photos_per_s": {"1": 1.2, "2": 2.1},
               "resume": {"processed_twice": 0, "missing": 0}, "peak_worker_mb": 1800.0}
    sb.write(tmp_path / "survey", figures, {"photos": 1000, "large": 25, "native": 975, "sources": 660},
             {"environment": "CPU", "killed_at": 512, "export_seconds": 31.0,
              "agreement": {"photos": 1000, "same_scale": 0.998, "crack_share_difference": 0.00012}})
    import json

    assert json.loads((tmp_path / "survey.json").read_text()) == figures
    page = (tmp_path / "survey.md").read_text()
    assert "| `python -m pipelines.survey run --workers 2` | 2.10 | 2.10x |" in page and "after 512 rows" in page
    assert (tmp_path / "survey.png").stat().st_size > 1000
    assert "99.8 % of the 1000 photos got the" in page and "differ by 0.012 points" in page
    assert "took 31 s before the timings" in page


def test_agreement_compares_predicts_table_with_the_surveys_photo_by_photo(tmp_path):
    pd.DataFrame({"image": ["/p/a.jpg", "/p/b.jpg", "/p/c.jpg"], "scale": [0.5, 0.25, 1.0],
                  "crack_share": [0.10, 0.02, 0.0]}).to_csv(tmp_path / "predictions.csv", index=False)
    pd.DataFrame({"path": ["/p/c.jpg", "/p/a.jpg", "/p/b.jpg"], "scale": [1.0, 0.500001, 0.5],
                  "crack_share": [0.0, 0.12, 0.02]}).to_parquet(tmp_path / "survey.parquet")
    found = sb.agreement(tmp_path / "predictions.csv", tmp_path / "survey.parquet")
    assert found["photos"] == 3 and found["same_scale"] == pytest.approx(2 / 3)
    assert found["crack_share_difference"] == pytest.approx(0.02 / 3)
