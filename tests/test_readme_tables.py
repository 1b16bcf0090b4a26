"""The README's result tables are generated from the committed result files and must match them."""
import os

import pytest

from sparsekit.bench import readme_tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_tables_match_the_result_files():
    assert readme_tables.main(["--check", os.path.join(ROOT, "README.md")]) == 0


def test_quality_results_record_the_calibration_size():
    rows = readme_tables._rows(os.path.join(readme_tables.RESULTS, "quality.csv"))
    assert rows and all(int(r["calib"]) >= 1 for r in rows)
    from sparsekit.workloads import DEFAULT_CALIB

    # the committed table uses the same default calibration as `sparsekit compress`
    for r in rows:
        assert int(r["calib"]) == DEFAULT_CALIB[r["workload"]]


def test_check_fails_on_a_stale_table(tmp_path):
    text = open(os.path.join(ROOT, "README.md")).read()
    stale = text.replace("<!-- quality-table:end -->", "| stale | row |\n<!-- quality-table:end -->")
    p = tmp_path / "README.md"
    p.write_text(stale)
    assert readme_tables.main(["--check", str(p)]) == 1
    assert readme_tables.main(["--write", str(p)]) == 0
    assert p.read_text() == text


def test_missing_block_is_an_error(tmp_path):
    p = tmp_path / "README.md"
    p.write_text("# no tables\n")
    with pytest.raises(ValueError, match="quality-table"):
        readme_tables.main(["--check", str(p)])
