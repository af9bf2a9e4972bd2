"""mmv.data.read_table: the one reader of the data sets' CSV tables."""

from __future__ import annotations

import gzip

import pytest

from mmv.data import TableError, read_table


def test_reads_rows_as_dicts_with_stripped_header_names_and_skips_blank_lines(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("\ufeffPath , Edema\na.jpg,1\n\n , \nb.jpg,\n", encoding="utf-8")
    assert read_table(path, ["Path", "Edema"]) == [{"Path": "a.jpg", "Edema": "1"}, {"Path": "b.jpg", "Edema": ""}]


def test_reads_gzip_compressed_tables(tmp_path):
    path = tmp_path / "split.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8", newline="") as stream:
        stream.write("dicom_id,split\nx1,train\n")
    assert read_table(path, ["split"]) == [{"dicom_id": "x1", "split": "train"}]


@pytest.mark.parametrize(
    "content, reason",
    [
        ("", "empty file"),
        ("a,b\n1,2\n", "missing columns \\['Edema'\\]"),
        ("a,Edema\n1\n", "line 2 has 1 cells, the header 2"),
    ],
)
def test_bad_tables_raise_table_error_with_path_and_reason(tmp_path, content, reason):
    path = tmp_path / "t.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TableError, match=reason) as error:
        read_table(path, ["Edema"])
    assert error.value.path == path and str(path) in str(error.value)


def test_missing_and_corrupt_files_raise_table_error(tmp_path):
    with pytest.raises(TableError, match="file not found"):
        read_table(tmp_path / "absent.csv")
    corrupt = tmp_path / "t.csv.gz"
    corrupt.write_bytes(b"not gzip at all")
    with pytest.raises(TableError, match="cannot read"):
        read_table(corrupt)
