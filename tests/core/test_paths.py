"""An output path is refused before the work when its result could not be written there."""

import pytest

from m2vla_core.paths import check_destination


def test_a_fresh_path_under_a_directory_is_accepted(tmp_path):
    check_destination(tmp_path / "new" / "report.json", "--json", directory=False)
    check_destination(tmp_path / "new" / "out", "--out", directory=True)


def test_the_wrong_kind_of_existing_path_is_refused_with_the_hint(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x\n")
    with pytest.raises(ValueError, match=r"^--json .* is a directory; give a file path \(e\.g\. x\)$"):
        check_destination(tmp_path, "--json", directory=False, hint=" (e.g. x)")
    with pytest.raises(ValueError, match=r"^out .* is a file; give a directory$"):
        check_destination(a_file, "out", directory=True)


def test_a_path_under_a_regular_file_is_refused_naming_the_file(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x\n")
    with pytest.raises(ValueError, match=f"{a_file} is a file, not a directory"):
        check_destination(a_file / "deeper" / "model.onnx", "out", directory=False)
