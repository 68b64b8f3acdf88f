"""web/report: one self-contained HTML file from head, run and study folders and an audit, read through
pipeline.artifacts; images embedded once; missing images and caches are notes, not crashes.

Heads are fitted on a synthetic cache (no TensorFlow) whose rows point at generated image files.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import pixels, save_image
from PIL import Image
from report_fixtures import CLASSES, PER_CLASS, ReportWorld
from typer.testing import CliRunner

import cli
from pipeline.artifacts import (
    AUDIT_JSON,
    CV_PREDICTIONS_CSV,
    HEAD_JSON,
    LEARNING_CURVES_PNG,
    METRICS_JSON,
    PREDICTIONS_CSV,
    RUN_JSON,
    RUN_MODEL,
    SIDECAR_SUFFIX,
    read_json,
    read_predictions,
    write_json,
)
from pipeline.errors import UserError
from pipeline.web import report as web_report
from pipeline.web.render import Thumbnails
from pipeline.web.report import build_report, report_images


def quiet(message: str) -> None:
    """Drop log lines."""


def build(world: ReportWorld, tmp_path: Path, *folders, **kwargs) -> str:
    out = build_report(
        folders or [world.heads["logreg"], world.heads["knn"]],
        out=tmp_path / "report.html",
        log=quiet,
        **{"projection": "pca", **kwargs},
    )
    return out.read_text(encoding="utf-8")


def image_table(html: str) -> list[str]:
    """The page's embedded images (the JSON its script reads)."""
    blob = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S).group(1)
    return json.loads(blob)["images"]


def section(html: str, element_id: str) -> str:
    """The HTML from the element with this id to the next section heading."""
    start = html.index(f'id="{element_id}"')
    end = html.find("<h2", start)
    return html[start : end if end > 0 else len(html)]


# -- the report ------------------------------------------------------------------------------------
def test_report_is_self_contained_and_embeds_each_image_once(report_world: ReportWorld, tmp_path: Path) -> None:
    html = build(report_world, tmp_path, audit=report_world.audit)
    assert "http://" not in html and "https://" not in html  # nothing to fetch: no CDN, no remote image
    for target in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert target.startswith(("data:", "#")), target
    images = image_table(html)
    n_rows = PER_CLASS * len(CLASSES)
    assert len(images) == n_rows  # the map shows every cached image; galleries reuse the same entries
    assert html.count("data:image/jpeg;base64,") == n_rows  # each embedded once
    for uri in images[:3]:
        thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert thumb.format == "JPEG" and thumb.size == (96, 96)
    referenced = {int(i) for i in re.findall(r'data-img="(-?\d+)"', html)} - {-1}
    assert referenced and max(referenced) < len(images)


def test_thumbnails_started_early_are_the_ones_the_page_shows(
    report_world: ReportWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train starts report_images(cache) while the head fits: they are every image the page embeds, and the
    page is the same with them as without (a pool of another size is not used)."""
    own = image_table(build(report_world, tmp_path))
    started = report_images(report_world.cache)
    assert len(started) == len(own) and all(Path(p).is_file() for p in started)
    with Thumbnails(96, workers=1) as early:
        early.start(started)
        assert image_table(build(report_world, tmp_path, thumbnails=early)) == own
        assert len(early) == len(own)  # the page asked for no image that was not started
    with Thumbnails(48) as other_size:
        assert image_table(build(report_world, tmp_path, thumbnails=other_size)) == own
        assert len(other_size) == 0
    monkeypatch.setattr(web_report, "MAP_THUMBNAILS", len(own) - 1)  # the map shows a sample: start none
    assert report_images(report_world.cache) == []


def test_summary_table_has_intervals_and_the_paired_verdict(report_world: ReportWorld, tmp_path: Path) -> None:
    html = build(report_world, tmp_path)
    summary = section(html, "summary")
    assert "logreg (logreg head)" in summary and "knn (knn head)" in summary
    assert re.search(r"0\.\d{4} \[0\.\d{3}, [01]\.\d{3}\]", summary)  # a metric with its 95% interval
    paired = section(html, "paired-table")
    assert re.search(r"logreg \(logreg head\) vs knn \(knn head\): [+-]\d+ images? of \d+, p = [\d.e-]+", paired)


class CellParser(HTMLParser):
    """The confusion-matrix cells (count, the gallery they open) and each cell gallery's image paths."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[tuple[str | None, str]] = []  # (data-target, text) of every td.cell, in order
        self.galleries: dict[str, list[str]] = {}
        self._td: list | None = None
        self._gallery: str | None = None
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "td" and "cell" in (a.get("class") or "").split():
            self._td = [a.get("data-target"), ""]
        if tag == "div":
            self._depth += 1
            if "cell-gallery" in (a.get("class") or ""):
                self._gallery, self._open_depth = a["id"], self._depth
                self.galleries[a["id"]] = []
        if tag == "img" and self._gallery:
            self.galleries[self._gallery].append(a["alt"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._td is not None:
            self.cells.append((self._td[0], self._td[1].strip()))
            self._td = None
        if tag == "div":
            if self._gallery and self._depth == self._open_depth:
                self._gallery = None
            self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._td is not None:
            self._td[1] += data


@pytest.mark.parametrize("method", [0, 1])
def test_each_confusion_cell_holds_its_images(report_world: ReportWorld, tmp_path: Path, method: int) -> None:
    parser = CellParser()
    parser.feed(section(build(report_world, tmp_path), f"method-{method}"))
    predictions = read_predictions(report_world.heads[["logreg", "knn"][method]] / PREDICTIONS_CSV)
    assert len(parser.cells) == len(CLASSES) ** 2
    for (target, text), (t, q) in zip(parser.cells, [(t, q) for t in range(3) for q in range(3)]):
        paths = sorted(
            predictions.paths[k]
            for k in range(len(predictions))
            if predictions.y_true[k] == t and predictions.y_pred[k] == q
        )
        assert int(text) == len(paths)
        assert target == (f"cell-{method}-{t}-{q}" if paths else None)
        if paths:
            assert sorted(parser.galleries[target]) == paths


def test_galleries(report_world: ReportWorld, tmp_path: Path) -> None:
    html = section(build(report_world, tmp_path), "method-0")
    predictions = read_predictions(report_world.heads["logreg"] / PREDICTIONS_CSV)
    wrong = int((~predictions.correct).sum())
    assert wrong > 0, "the synthetic data should leave some test images misclassified"
    for title in ("Confidently wrong", "Hesitant", "A few per class"):
        assert f"<h3>{title}</h3>" in html
    confidently_wrong = html[html.index("<h3>Confidently wrong</h3>") : html.index("<h3>Hesitant</h3>")]
    assert confidently_wrong.count('<figure class="thumb wrong">') == min(wrong, 24)
    assert "true " in confidently_wrong and "predicted " in confidently_wrong and "margin" not in confidently_wrong


def test_audit_findings(report_world: ReportWorld, tmp_path: Path) -> None:
    audit = section(build(report_world, tmp_path, audit=report_world.audit), "audit")
    issues = list(csv.DictReader(open(report_world.audit / "label_issues.csv")))
    pair = next(csv.DictReader(open(report_world.audit / "near_duplicates.csv")))
    for path in [r["path"] for r in issues] + [pair["path_a"], pair["path_b"]]:
        assert f'alt="{path}"' in audit
    assert "suggested bee" in audit and "cosine 0.9910" in audit and "conflicting_labels" in audit
    assert "more data: about +2 points per doubling" in audit and 'src="data:image/png;base64,' in audit


def test_embedding_map_marks_the_misclassified(report_world: ReportWorld, tmp_path: Path) -> None:
    html = build(report_world, tmp_path)
    head = report_world.heads["logreg"]
    wrong = sum(
        int((~read_predictions(head / name).correct).sum())
        for name in (PREDICTIONS_CSV, CV_PREDICTIONS_CSV)
        if (head / name).is_file()
    )
    svg = html[html.index('<svg id="map"') : html.index("</svg>")]
    assert svg.count("<circle") == PER_CLASS * len(CLASSES)
    assert svg.count('class="wrong"') == wrong > 0


def test_study_table_advice_and_checkout(report_world: ReportWorld, tmp_path: Path) -> None:
    html = build(report_world, tmp_path, report_world.study)
    study = section(html, "study")
    assert study.count('<tr class="winner"') == 1 and "train a linear head on the top layer" in study
    assert "ImageNet checkout: MobileNetV2" in study and "data:image/png;base64," in study
    assert "ResNet50/top/knn: over the time budget" in study
    assert "winner (winner)" in section(html, "summary")  # the winner head is a method of the report


def test_a_finetune_run_folder(report_world: ReportWorld, tmp_path: Path) -> None:
    run = tmp_path / "run"  # the files of a fine-tuning run (the model file itself is not read)
    run.mkdir()
    for name in (METRICS_JSON, PREDICTIONS_CSV):
        shutil.copy(report_world.heads["logreg"] / name, run / name)
    (run / RUN_MODEL).write_bytes(b"a Keras model")
    write_json(run / (RUN_MODEL + SIDECAR_SUFFIX), {"classes": CLASSES, "image_size": 32, "resize": "bilinear"})
    write_json(
        run / RUN_JSON,
        {
            "kind": "finetune",
            "dataset_root": str(report_world.data),
            "cache_path": str(report_world.cache),
            "classes": CLASSES,
        },
    )
    save_image(run / LEARNING_CURVES_PNG, pixels((30, 30, 30), 4, (50, 30)))
    html = build(report_world, tmp_path, run, report_world.heads["knn"])
    assert "<td>run</td>" in section(html, "summary")
    method = section(html, "method-0")
    assert "Training curves" in method and "data:image/png;base64," in method
    assert '<svg id="map"' in html and "could not be read" not in html


def test_missing_images_and_cache_are_notes(report_world: ReportWorld, tmp_path: Path) -> None:
    head = tmp_path / "moved-head"
    shutil.copytree(report_world.heads["logreg"], head)
    meta = read_json(head / HEAD_JSON)
    partial = tmp_path / "partial"
    for path in read_predictions(head / PREDICTIONS_CSV).paths[::2]:  # half of the test images are still there
        (partial / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(report_world.data / path, partial / path)
    write_json(head / HEAD_JSON, {**meta, "cache_path": str(tmp_path / "gone.h5"), "dataset_root": str(partial)})
    html = build(report_world, tmp_path, head)
    assert "embedding map left out" in html and "gone.h5" in html and '<svg id="map"' not in html
    assert "could not be read and are shown as a grey placeholder" in html
    images = image_table(html)
    assert images.count("") == len(images) // 2  # the JavaScript shows the placeholder for these


def test_head_without_predictions_keeps_its_row(report_world: ReportWorld, tmp_path: Path) -> None:
    head = tmp_path / "old-head"
    shutil.copytree(report_world.heads["knn"], head)
    (head / PREDICTIONS_CSV).unlink()
    html = build(report_world, tmp_path, report_world.heads["logreg"], head)
    assert f"has no {PREDICTIONS_CSV}" in html and "old-head (knn head)" in section(html, "summary")
    assert 'id="method-1"' not in html and "paired-table" not in html


def test_user_errors(report_world: ReportWorld, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a folder"):
        build_report([tmp_path / "nothing"], out=tmp_path / "r.html", log=quiet)
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not a head, run or study folder"):
        build_report([tmp_path / "plain"], out=tmp_path / "r.html", log=quiet)
    with pytest.raises(UserError, match="^projection is 'umap'"):
        build_report([report_world.heads["logreg"]], out=tmp_path / "r.html", projection="umap", log=quiet)
    with pytest.raises(UserError, match=f"has no {AUDIT_JSON}"):
        build_report([report_world.heads["logreg"]], tmp_path / "plain", tmp_path / "r.html", log=quiet)
    assert not (tmp_path / "r.html").exists()


def test_cli_report_with_tsne(report_world: ReportWorld, tmp_path: Path) -> None:
    out = tmp_path / "cli.html"
    result = CliRunner().invoke(
        cli.app,
        [
            "report",
            str(report_world.heads["logreg"]),
            "--audit",
            str(report_world.audit),
            "--out",
            str(out),
            "--thumb-px",
            "48",
        ],
    )
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    html = out.read_text()
    assert "t-SNE" in html and 'id="audit"' in html
    thumb = Image.open(io.BytesIO(base64.b64decode(image_table(html)[0].split(",", 1)[1])))
    assert thumb.size == (48, 48)
    bad = CliRunner().invoke(cli.app, ["report", str(tmp_path / "absent"), "--out", str(out)])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: ")


def test_reliability_diagram_and_unknown_split(report_world: ReportWorld, tmp_path: Path) -> None:
    html = section(build(report_world, tmp_path), "method-0")
    metrics = json.loads((report_world.heads["logreg"] / "metrics.json").read_text())
    unknown = metrics["unknown"]
    assert "<h3>Calibration and unknowns</h3>" in html
    assert 'class="plot reliability" src="data:image/svg+xml' in html
    total = unknown["n_accepted"] + unknown["n_unknown"]
    assert f"Test part: {unknown['n_accepted']} of {total} accepted" in html
    assert f"{unknown['n_unknown']} called unknown" in html
