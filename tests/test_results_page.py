"""docs/results.md and README.md's headline table are generated from benchmarks/results/*.json."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_report():
    spec = importlib.util.spec_from_file_location("benchmarks_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_page_is_generated_from_the_benchmark_json():
    report = load_report()
    assert (ROOT / "docs" / "results.md").read_text() == report.render_page(), (
        "docs/results.md differs from the benchmark JSON: run python -m benchmarks report"
    )


def test_readme_headline_table_is_generated_from_the_benchmark_json():
    report = load_report()
    readme = (ROOT / "README.md").read_text()
    assert readme == report.render_readme(readme), (
        "README.md's headline table differs from the benchmark JSON: run python -m benchmarks report"
    )


def test_results_page_stays_short():
    assert len((ROOT / "docs" / "results.md").read_text().splitlines()) <= 400
