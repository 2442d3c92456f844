"""Result files: writer, resume recovery, reading Cohen's format, and the analysis numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dualrs_route.experts.errors import DataError, ResumeMismatchError
from dualrs_route.router.results import (
    COLUMNS,
    ResultsWriter,
    analysis_report,
    certified_accuracy,
    format_value,
    oracle_table,
    read_results,
    sidecar_path,
    summarize,
)

SETTINGS = {"N": 100, "seed": 0, "models": [{"reference": "a", "sha256": {"model.safetensors": "x"}}]}


def row(i, label=1, predict=1, radius=0.5):
    return {"idx": i, "label": label, "predict": predict, "radius": radius, "correct": int(predict == label),
            "time": 0.01, "expert": "0:a", "sigma": 0.25, "radius_expert": radius, "p_expert_lower": 0.9,
            "n_expert": 90}


def test_writer_creates_header_sidecar_and_flushes_each_row(tmp_path):
    path = tmp_path / "r.tsv"
    writer = ResultsWriter(path, settings=SETTINGS, metadata={"started": "t0"})
    assert path.read_text() == "\t".join(COLUMNS) + "\n"
    writer.write(row(0))
    assert path.read_text().count("\n") == 2  # flushed before close
    writer.close(complete=False)
    lines = path.read_text().splitlines()
    assert lines[1].split("\t")[:6] == ["0", "1", "1", "0.500000", "1", "0.010000"]
    assert lines[1].split("\t")[8] == "-"  # router columns empty for a single expert
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["settings"] == SETTINGS and meta["complete"] is False and meta["columns"] == list(COLUMNS)


def test_writer_resumes_and_truncates_a_partial_line(tmp_path):
    path = tmp_path / "r.tsv"
    w = ResultsWriter(path, settings=SETTINGS, metadata={"started": "t0"})
    for i in range(3):
        w.write(row(i))
    w.close()
    with open(path, "a") as handle:
        handle.write("3\t1\t1\t0.4")  # killed mid-row
    w2 = ResultsWriter(path, settings=SETTINGS, metadata={"started": "t1"})
    assert w2.done == {0, 1, 2}
    w2.write(row(3))
    w2.close()
    idx = [line.split("\t")[0] for line in path.read_text().splitlines()[1:]]
    assert idx == ["0", "1", "2", "3"]
    assert json.loads(sidecar_path(path).read_text())["resumed"] == ["t1"]


def test_writer_refuses_other_settings_and_foreign_files(tmp_path):
    path = tmp_path / "r.tsv"
    ResultsWriter(path, settings=SETTINGS, metadata={}).close()
    changed = json.loads(json.dumps(SETTINGS))
    changed["models"][0]["sha256"]["model.safetensors"] = "y"
    with pytest.raises(ResumeMismatchError, match="models"):
        ResultsWriter(path, settings=changed, metadata={})
    foreign = tmp_path / "foreign.tsv"
    foreign.write_text("idx\tlabel\n")
    with pytest.raises(ResumeMismatchError, match="not written by dualrs-route"):
        ResultsWriter(foreign, settings=SETTINGS, metadata={})
    sidecar_path(path).write_text("{broken")
    with pytest.raises(ResumeMismatchError, match="not valid JSON"):
        ResultsWriter(path, settings=SETTINGS, metadata={})


def test_format_value():
    assert format_value(None) == "-"
    assert format_value(0.1234567) == "0.123457"
    assert format_value(np.float32(0.5)) == "0.500000"
    assert format_value(math.inf) == "inf"
    assert format_value(7) == "7"


def test_read_cohen_file_and_summarize(tmp_path):
    path = tmp_path / "cohen.tsv"
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
                    "0\t3\t3\t0.812\t1\t0:00:15.021\n"
                    "20\t8\t-1\t0.0\t0\t0:00:14.900\n"
                    "40\t0\t0\t0.25\t1\t0:00:15.350\n"
                    "60\t6\t2\t1.2\t0\t0:00:15.001\n")
    table = read_results(path)
    assert table.idx.tolist() == [0, 20, 40, 60] and table.metadata == {}
    assert certified_accuracy(table, [0, 0.25, 0.5, 1.0]) == [0.5, 0.5, 0.25, 0.0]
    s = summarize(table, [0.0, 0.25])
    assert s["acr"] == pytest.approx((0.812 + 0.25) / 4) and s["abstain_rate"] == 0.25 and s["mode"] == "single"


def test_oracle_table_uses_common_examples_and_best_correct_radius(tmp_path):
    a = tmp_path / "a.tsv"
    b = tmp_path / "b.tsv"
    head = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
    a.write_text(head + "0\t1\t1\t0.3\t1\t0:00:01\n1\t2\t0\t0.9\t0\t0:00:01\n2\t0\t0\t0.1\t1\t0:00:01\n")
    b.write_text(head + "0\t1\t1\t0.6\t1\t0:00:01\n1\t2\t2\t0.2\t1\t0:00:01\n3\t0\t0\t2.0\t1\t0:00:01\n")
    table = oracle_table([read_results(a), read_results(b)])
    assert table.idx.tolist() == [0, 1]
    assert table.radius.tolist() == [0.6, 0.2] and table.correct.tolist() == [1, 1]
    assert table.expert == ["b", "b"]
    with pytest.raises(DataError):
        oracle_table([read_results(a)])


def test_analysis_report_router_captured_gain(tmp_path):
    head = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
    (tmp_path / "e1.tsv").write_text(head + "0\t1\t1\t1.0\t1\t0\n1\t1\t0\t0.0\t0\t0\n")
    (tmp_path / "e2.tsv").write_text(head + "0\t1\t0\t0.0\t0\t0\n1\t1\t1\t1.0\t1\t0\n")
    router = tmp_path / "router.tsv"
    router.write_text(head + "0\t1\t1\t1.0\t1\t0\n1\t1\t1\t0.5\t1\t0\n")
    sidecar_path(router).write_text(json.dumps({"settings": {"mode": "router"}}))
    cascade = tmp_path / "cascade.tsv"
    cascade.write_text(head + "0\t1\t1\t0.25\t1\t0\n1\t1\t1\t0.5\t1\t0\n")
    sidecar_path(cascade).write_text(json.dumps({"settings": {"mode": "cascade"}}))
    report = analysis_report([str(tmp_path / "e1.tsv"), str(tmp_path / "e2.tsv"), str(router), str(cascade)], [0.0, 0.5])
    # envelope ACR 0.5, oracle ACR 1.0, router ACR 0.75 -> captures half the gap; the cascade (0.375) loses a quarter
    assert report["captured_acr_gain"]["router"] == pytest.approx(0.5)
    assert report["captured_acr_gain"]["cascade"] == pytest.approx(-0.25)
    assert set(report["captured_acr_gain"]) == {"router", "cascade"}  # not the experts themselves


def test_read_results_errors(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_results(empty)
    bad = tmp_path / "bad.tsv"
    bad.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\tx\t0.1\t1\t0\n")
    with pytest.raises(DataError, match="line 2: predict"):
        read_results(bad)
