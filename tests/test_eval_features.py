import json

import numpy as np
import pytest

from mmv.eval.features import (
    FeatureIndex,
    FeatureTableError,
    FeatureWriter,
    RowSelection,
    read_feature_index,
    read_feature_table,
)


def small_index(num_rows=6):
    labels = np.array([[1, 0], [0, np.nan], [1, 1], [-1, 0], [np.nan, np.nan], [0.5, 1]])[:num_rows]
    return FeatureIndex(
        ids=tuple(f"files/p1/s{i}/image {i}.jpg" for i in range(num_rows)),
        splits=("train", "train", "val", "test", "", "train")[:num_rows],
        modalities=("xray", "ct") * (num_rows // 2),
        groups=("p1", "p1", "p2", "", "p3, quoted", "p4")[:num_rows],
        label_names=("Edema", "Pleural Effusion"),
        labels=labels,
    )


def test_write_then_read_round_trip(tmp_path):
    index = small_index()
    cls = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    with FeatureWriter(tmp_path / "table", index, {"cls": 4, "patch_mean": 3}) as writer:
        assert list(writer.pending_rows) == list(range(6)) and not writer.complete
        writer.write(np.array([4, 0, 2]), {"cls": cls[[4, 0, 2]], "patch_mean": np.ones((3, 3))})
        writer.write(np.array([1, 3, 5]), {"cls": cls[[1, 3, 5]], "patch_mean": np.zeros((3, 3))})
        assert writer.complete
    table = read_feature_table(tmp_path / "table", "cls")
    assert table.index.same_as(index)
    np.testing.assert_array_equal(table.features, cls)
    assert isinstance(table.features, np.memmap) and not table.features.flags.writeable
    patch = read_feature_table(tmp_path / "table", "patch_mean").features
    np.testing.assert_array_equal(patch[:, 0], [1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(table.select([5, 1])[0:2], cls[[5, 1]])
    subset = table.subset([2, 0], ["Pleural Effusion"])
    assert subset.index.ids == (index.ids[2], index.ids[0])
    np.testing.assert_array_equal(subset.index.labels, [[1], [0]])
    np.testing.assert_array_equal(subset.features, cls[[2, 0]])


def test_reopening_resumes_where_it_stopped(tmp_path):
    index = small_index()
    writer = FeatureWriter(tmp_path, index, {"cls": 2})
    writer.write(np.array([0, 1]), {"cls": np.ones((2, 2))})
    writer.close()
    with pytest.raises(FeatureTableError, match="4 of 6 rows have no features yet"):
        read_feature_table(tmp_path)
    assert read_feature_table(tmp_path, allow_incomplete=True).features.shape == (6, 2)
    resumed = FeatureWriter(tmp_path, index, {"cls": 2})
    assert list(resumed.pending_rows) == [2, 3, 4, 5]
    resumed.write(resumed.pending_rows, {"cls": np.full((4, 2), 2.0)})
    resumed.close()
    np.testing.assert_array_equal(read_feature_table(tmp_path).features[:, 0], [1, 1, 2, 2, 2, 2])


def test_reopening_with_another_index_or_width_is_refused(tmp_path):
    FeatureWriter(tmp_path, small_index(), {"cls": 2}).close()
    with pytest.raises(FeatureTableError, match="different index"):
        FeatureWriter(tmp_path, small_index(4), {"cls": 2})
    with pytest.raises(FeatureTableError, match="holds arrays"):
        FeatureWriter(tmp_path, small_index(), {"cls": 3})


def test_bad_writes_are_named(tmp_path):
    writer = FeatureWriter(tmp_path, small_index(), {"cls": 2})
    with pytest.raises(ValueError, match=r"arrays\['cls'\] must have shape \(2, 2\)"):
        writer.write(np.array([0, 1]), {"cls": np.ones((2, 3))})
    with pytest.raises(ValueError, match="must be finite"):
        writer.write(np.array([0]), {"cls": np.array([[np.nan, 0.0]])})
    with pytest.raises(ValueError, match="rows must lie in 0..5"):
        writer.write(np.array([6]), {"cls": np.ones((1, 2))})
    with pytest.raises(ValueError, match="arrays must have exactly the keys"):
        writer.write(np.array([0]), {"other": np.ones((1, 2))})
    assert list(writer.pending_rows) == list(range(6))


def test_index_validation():
    with pytest.raises(ValueError, match="ids must be unique"):
        FeatureIndex(("a", "a"), ("", ""), ("", ""), ("", ""), (), np.zeros((2, 0)))
    with pytest.raises(ValueError, match="splits must have one entry per id"):
        FeatureIndex(("a", "b"), ("",), ("", ""), ("", ""), (), np.zeros((2, 0)))
    with pytest.raises(ValueError, match="label_names must be unique"):
        FeatureIndex(("a",), ("",), ("",), ("",), ("split",), np.zeros((1, 1)))


def test_unreadable_tables_raise_typed_errors_with_the_path(tmp_path):
    with pytest.raises(FeatureTableError, match="not a feature table") as error:
        read_feature_table(tmp_path)
    assert error.value.path == tmp_path
    FeatureWriter(tmp_path, small_index(), {"cls": 2}).close()
    with pytest.raises(FeatureTableError, match="has no array 'patch_mean'"):
        read_feature_table(tmp_path, "patch_mean")
    index_path = tmp_path / "index.csv"
    index_path.write_text(index_path.read_text().replace(",1,0", ",yes,0", 1))
    with pytest.raises(FeatureTableError, match="'yes' is not a number") as error:
        read_feature_index(index_path)
    assert error.value.path == index_path
    (tmp_path / "features.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(FeatureTableError, match="not a mmv-features version 1"):
        read_feature_table(tmp_path)
    (tmp_path / "features.json").write_text("{")
    with pytest.raises(FeatureTableError, match="cannot read"):
        read_feature_table(tmp_path)


def test_truncated_array_file_is_reported(tmp_path):
    with FeatureWriter(tmp_path, small_index(), {"cls": 2}) as writer:
        writer.write(np.arange(6), {"cls": np.ones((6, 2))})
    array_path = tmp_path / "cls.npy"
    array_path.write_bytes(array_path.read_bytes()[:-8])
    with pytest.raises(FeatureTableError) as error:
        read_feature_table(tmp_path)
    assert error.value.path == array_path


def test_row_selection_reads_slices_only():
    array = np.arange(20, dtype=np.float32).reshape(10, 2)
    selection = RowSelection(array, [7, 2, 9])
    assert selection.shape == (3, 2) and len(selection) == 3
    np.testing.assert_array_equal(selection[1:], array[[2, 9]])
    np.testing.assert_array_equal(np.asarray(selection), array[[7, 2, 9]])
    with pytest.raises(TypeError, match="slices of step 1"):
        selection[0]
    with pytest.raises(ValueError, match="rows must lie in 0..9"):
        RowSelection(array, [10])
