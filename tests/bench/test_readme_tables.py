"""``bench/readme_tables.py``: the README's results section is what the JSON files in bench/results/ give."""

from __future__ import annotations

from bench import readme_tables


def test_readme_results_section_is_regenerated_from_the_json_files():
    readme = readme_tables.README.read_text()
    section = readme.split(readme_tables.BEGIN, 1)[1].split(readme_tables.END, 1)[0]
    assert section.strip("\n") == readme_tables.section()


def test_every_source_file_is_there_and_has_a_line_in_the_results_readme():
    notes = (readme_tables.RESULTS / "README.md").read_text()
    for name in readme_tables.SOURCES.values():
        assert (readme_tables.RESULTS / name).is_file(), name
        assert f"`{name}`" in notes, name


def test_every_json_file_has_a_line_in_the_results_readme():
    notes = (readme_tables.RESULTS / "README.md").read_text()
    for path in readme_tables.RESULTS.glob("*.json"):
        assert f"`{path.name}`" in notes, path.name


def test_decode_kernel_rows_of_both_layouts():
    """``bench/decode.py`` keeps its kernel rows under ``kernel``; the older sweep file under ``timings``."""
    row = {"context": 16384, "pattern": "dense", "variant": "flat", "graph_ms": 1.0}
    assert readme_tables.kernel_rows({"kernel": [row, {"variant": "split", "error": "oom"}]}) == [row]
    assert readme_tables.kernel_rows({"timings": [row, {"variant": "x", "ms": 2.0}]}) == [row]
    assert readme_tables.kernel_rows({"kernel": {"error": "RuntimeError()"}}) == []
