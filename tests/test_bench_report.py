"""The benchmark report without a GPU: report.md, geometric means and worst cases built from the
committed H100 run, the plots, the roofline's byte count, and --compare's ordering on synthetic
runs."""

import math
import os

import pytest

from cnnkern.benchmarks import harness, report

COMMITTED = os.path.join(harness.RESULTS_DIR, "nvidia-h100-80gb-hbm3-2026-11-25-5f0dac7")
CEILINGS = {"copy_GBps": 3000.0, "bf16_matmul_TFLOPs": 800.0}


def _committed(op):
    (data,) = [d for d in report.load(COMMITTED) if d["op"] == op]
    return data


def test_load_reads_every_committed_op_in_order():
    ops = [d["op"] for d in report.load(COMMITTED)]
    assert ops == ["conv2d", "conv_bn_relu", "residual_add", "local_response_norm"]
    with pytest.raises(FileNotFoundError):
        report.load(os.path.dirname(__file__))  # no results JSON there


def test_geomean_and_worst_case_match_the_json():
    # Independently of the report code: the speedups of triton's plain forward on ResNet-50 from the raw medians.
    raw = _committed("conv2d")["results"]
    base = {r["case"]: r["median_ms"] for r in raw if r["provider"] == "torch"}
    mine = {
        r["case"]: base[r["case"]] / r["median_ms"]
        for r in raw
        if r["provider"] == "triton" and not r["case"].endswith("+bias+relu")
    }
    assert len(mine) == 23
    want_geo = math.exp(sum(math.log(v) for v in mine.values()) / len(mine))
    worst_case = min(mine, key=mine.get)

    rows = report.summarize(report.records(_committed("conv2d")))
    (row,) = [r for r in rows if r["provider"] == "triton" and r["kind"] == "fwd"]
    assert row["n"] == 23 and row["network"] == "resnet50" and row["layout"] == "NHWC"
    assert row["torch"]["geomean"] == pytest.approx(want_geo)
    assert row["torch"]["worst_case"] == worst_case and row["torch"]["worst"] == pytest.approx(mine[worst_case])
    assert row["torch"]["best"] == pytest.approx(max(mine.values()))
    assert row["inductor"] is None  # not measured in that run
    assert row["noisy"] == sum(
        r["wide_spread"] for r in raw if r["provider"] == "triton" and not r["case"].endswith("+bias+relu")
    )
    # the fused epilogue is its own pass, not mixed into the plain forward
    assert {r["kind"] for r in rows} == {"fwd", "fwd+bias+relu"}


def test_report_page_and_plots(tmp_path):
    written = report.build(COMMITTED, str(tmp_path))
    page = written[0]
    assert os.path.basename(page) == "report.md"
    names = {os.path.basename(p) for p in written[1:]}
    assert {"roofline.png", "speedup_resnet50.png", "speedup_alexnet.png", "speedup_other.png"} == names
    for p in written[1:]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 10_000
    text = open(page).read()
    assert "NVIDIA H100 80GB HBM3" in text and "5f0dac77f9113e83571c4810ef73eeeaeef458d9" in text
    assert "torch 2.11.0+cu130, triton 3.6.0, CUDA 13.0, cuDNN 91900" in text
    assert "Inductor was not measured in this run" in text
    for p in names:
        assert f"]({p})" in text  # every plot embedded
    # one per-layer table row: the wide spread is marked, the speedup is the JSON's
    row = next(line for line in text.splitlines() if line.startswith("| layer3.1.conv1 |"))
    assert "~0.3108" in row and "0.06x" in row and "1.5%" in row
    # the summary row of residual add on the large tensor, Triton forward
    assert any(
        line.startswith("| residual_add | large | triton | bf16 | NHWC | fwd | 1 | 1.65x") for line in text.splitlines()
    )
    # the committed report holds the same tables and figures as the one this code builds (its
    # wording may change without rewriting old results): every row of numbers in one is in the other
    committed = open(os.path.join(COMMITTED, "report.md")).read()

    def rows(page):
        return {line for line in page.splitlines() if line.startswith("|") and any(c.isdigit() for c in line)}

    assert rows(committed) == rows(text)


def _rec(case, provider, median, spread=0.01, direction="fwd", op="conv2d"):
    return harness.Result(
        op=op,
        case=case,
        shape="N32 C64 56x56 K64 3x3/1",
        dtype="bfloat16",
        layout="NHWC",
        provider=provider,
        direction=direction,
        median_ms=median,
        p20_ms=median * (1 - spread),
        p80_ms=median * (1 + spread),
        wide_spread=harness.is_wide_spread(median, median * (1 - spread), median * (1 + spread)),
        flops=2 * 32 * 64 * 56 * 56 * 64 * 9,
    )


def test_summary_against_inductor():
    recs = harness.finalize(
        [
            _rec("resnet50 a", "torch", 1.0),
            _rec("resnet50 a", "triton", 0.5),
            _rec("resnet50 a", "inductor", 0.8),
            _rec("resnet50 b", "torch", 1.0),
            _rec("resnet50 b", "triton", 2.0),
            _rec("resnet50 b", "inductor", 1.0),
        ],
        CEILINGS,
    )
    (tri,) = [r for r in report.summarize(recs) if r["provider"] == "triton"]
    assert tri["torch"]["geomean"] == pytest.approx(1.0)  # sqrt(2 * 0.5)
    assert tri["torch"]["worst_case"] == "resnet50 b"
    assert tri["inductor"]["geomean"] == pytest.approx(math.sqrt(1.6 * 0.5))
    assert tri["inductor"]["worst"] == pytest.approx(0.5) and tri["inductor"]["worst_case"] == "resnet50 b"
    (ind,) = [r for r in report.summarize(recs) if r["provider"] == "inductor"]
    assert ind["torch"]["geomean"] == pytest.approx(math.sqrt(1.25 * 1.0))
    page = "\n".join(report.op_tables("conv2d", recs))
    row_b = next(line for line in page.splitlines() if line.startswith("| b | N32 C64 56x56 K64 3x3/1 | triton |"))
    # triton on layer b: 2.0 ms against cuDNN's 1.0 and Inductor's 1.0
    assert row_b.endswith("| 0.50x | 1.000 (0.990-1.01) | 0.50x |")
    row_a = next(line for line in page.splitlines() if line.startswith("| a | N32 C64 56x56 K64 3x3/1 | triton |"))
    assert row_a.endswith("| 2.00x | 0.8000 (0.792-0.808) | 1.60x |")


def test_conv_bytes_for_the_roofline():
    # x 32x64x56x56, w 64x64x3x3, y 32x64x56x56 in bf16: each once forward, three times forward+backward
    r = _rec("resnet50 a", "torch", 1.0)
    elems = 32 * 64 * 56 * 56 * 2 + 64 * 64 * 9
    assert report.min_bytes(r) == elems * 2
    r3 = _rec("resnet50 a", "torch", 1.0, direction="fwd+bwd")
    r3.flops *= 3
    assert report.min_bytes(r3) == 3 * elems * 2
    assert report.intensity(r) == pytest.approx(r.flops / (elems * 2))
    # a memory-bound record keeps its own byte count; a shape that is not a conv has none
    r.bytes = 123
    assert report.min_bytes(r) == 123
    odd = _rec("x", "torch", 1.0)
    odd.shape = "64x256x64x64"
    assert report.min_bytes(odd) is None


def _write_run(path, meds, stamp):
    env = dict(harness.environment(), gpu_name="NVIDIA H100 80GB HBM3", timestamp_utc=stamp, commit=stamp[:10])
    recs = [_rec(case, prov, m, spread) for (case, prov), (m, spread) in meds.items()]
    return harness.write_results(harness.finalize(recs, CEILINGS), env, CEILINGS, str(path))


def test_compare_puts_regressions_first(tmp_path):
    a = _write_run(
        tmp_path / "a",
        {
            ("net slow", "triton"): (1.0, 0.01),
            ("net slower", "triton"): (1.0, 0.01),
            ("net noisy", "triton"): (1.0, 0.2),
            ("net same", "triton"): (1.0, 0.01),
            ("net faster", "triton"): (1.0, 0.01),
            ("net gone", "triton"): (1.0, 0.01),
        },
        "2026-01-01T00:00:00Z",
    )
    b = _write_run(
        tmp_path / "b",
        {
            ("net slow", "triton"): (1.2, 0.01),
            ("net slower", "triton"): (1.5, 0.01),
            ("net noisy", "triton"): (1.15, 0.2),
            ("net same", "triton"): (1.02, 0.01),
            ("net faster", "triton"): (0.5, 0.01),
            ("net new", "triton"): (1.0, 0.01),
        },
        "2026-02-01T00:00:00Z",
    )
    rows = report.compare(a, b)
    assert [r["key"][1] for r in rows] == ["net slower", "net slow", "net noisy", "net same", "net faster"]
    assert [r["verdict"] for r in rows] == ["regression", "regression", "noise", "same", "improvement"]
    assert rows[0]["change"] == pytest.approx(0.5)
    text = report.compare_text(a, b)
    lines = text.splitlines()
    body = [line for line in lines if line.startswith(("regression", "noise", "same", "improvement"))]
    assert body[0].startswith("regression") and "net slower" in body[0] and "+50.0%" in body[0]
    assert body[-1].startswith("improvement") and "-50.0%" in body[-1]
    assert "1 timings only in A, 1 only in B" in text
    assert "2 regressions, 1 improvements, 1 changes within the noise, 1 unchanged" in text
    # directories work as well as files
    assert len(report.compare(str(tmp_path / "a"), str(tmp_path / "b"))) == 5


def test_latest_report_is_the_newest_run(tmp_path):
    _write_run(tmp_path / "old", {("net a", "torch"): (1.0, 0.01)}, "2026-01-01T00:00:00Z")
    _write_run(tmp_path / "new", {("net a", "torch"): (1.0, 0.01)}, "2026-02-01T00:00:00Z")
    assert report.latest_report(str(tmp_path)) is None
    report.build(str(tmp_path / "old"))
    assert report.latest_report(str(tmp_path)) == str(tmp_path / "old" / "report.md")
    report.build(str(tmp_path / "new"))
    assert report.latest_report(str(tmp_path)) == str(tmp_path / "new" / "report.md")
    # the committed tree has a report
    assert report.latest_report(harness.RESULTS_DIR) is not None


def test_environment_lines_name_the_cnnkern_settings():
    """A run made with kernel pins or tuning says so in its report (the commit override does not)."""
    data = dict(_committed("conv2d"))
    assert not any("cnnkern settings" in line for line in report.environment_lines(data))
    data["env"] = dict(data["env"], cnnkern_env={"CNNKERN_CUDA_CONV_ALGO": "tune", "CNNKERN_GIT_COMMIT": "abc"})
    lines = report.environment_lines(data)
    assert "- cnnkern settings: `CNNKERN_CUDA_CONV_ALGO=tune`" in lines
