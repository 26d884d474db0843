"""MRC reading/writing: permissive headers, axis order, stacks, atomic writes."""

from __future__ import annotations

import warnings

import mrcfile
import numpy as np
import pytest

from cryospin_relion.errors import InputError
from cryospin_relion.io.mrc import open_stack, read_mrc, stack_shape, write_mrc, write_stack


def _raw(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, permissive=True) as m:
            return np.array(m.data), m.header.copy()


def test_no_map_id_reads_with_one_warning(shared_data):
    path = shared_data / "cryodrgn" / "relion31.mrcs"
    with pytest.warns(RuntimeWarning, match="relion31.mrcs"):
        data, voxel = read_mrc(path)
    raw, _ = _raw(path)
    assert data.dtype == np.float32 and data.shape == (5, 256, 256)
    np.testing.assert_array_equal(data, raw)
    assert voxel == pytest.approx(1.0)


def test_cella_zero_gives_no_voxel_and_stack_of_sections(shared_data):
    path = shared_data / "cryodrgn" / "empiar_10076_7.mrc"
    data, voxel = read_mrc(path)
    assert voxel is None
    st = open_stack(path)
    assert st.shape == (7, 320, 320) == stack_shape(path)
    np.testing.assert_array_equal(np.asarray(st[3], np.float32), data[3])


@pytest.mark.filterwarnings("ignore:.*anisotropic voxel size")
def test_nonstandard_axis_order_is_transposed(shared_data):
    path = shared_data / "mrcfile" / "EMD-3001.map"
    raw, h = _raw(path)
    assert (int(h.mapc), int(h.mapr), int(h.maps)) == (3, 1, 2)
    with pytest.warns(RuntimeWarning, match="mapc/mapr/maps"):
        data, voxel = read_mrc(path)
    # file array axes are (sections=y, rows=x, columns=z) -> out[z, y, x] = raw[y, x, z]
    assert data.shape == (raw.shape[2], raw.shape[0], raw.shape[1])
    np.testing.assert_array_equal(data, np.transpose(raw, (2, 0, 1)))
    assert voxel == pytest.approx(float(h.cella.x) / float(h.mx))


@pytest.mark.parametrize("name", ["griddataformats/1jzv.ccp4", "griddataformats/ispg_0.mrc", "pytme/em_map.map",
                                  "mrcfile/EMD-3197.map", "aspire/clean70SRibosome_vol_65p.mrc"])
def test_odd_maps_read_without_error(shared_data, name):
    path = shared_data / name
    if not path.exists():
        pytest.skip(f"{name} not in shared data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data, voxel = read_mrc(path)
    assert data.ndim == 3 and data.dtype == np.float32 and np.isfinite(data).all()
    assert voxel is None or voxel > 0


def test_write_mrc_roundtrip_origin_and_atomic(tmp_path):
    vol = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float64)
    out = tmp_path / "v.mrc"
    write_mrc(out, vol, 2.5)
    data, voxel = read_mrc(out)
    np.testing.assert_allclose(data, vol.astype(np.float32))
    assert voxel == pytest.approx(2.5)
    with mrcfile.open(out) as m:
        assert tuple(m.header.origin.tolist()) == (0.0, 0.0, 0.0)
        assert int(m.header.nxstart) == 0 and int(m.header.ispg) == 1
    write_mrc(out, vol, 2.5, origin_centered=True)
    with mrcfile.open(out) as m:
        assert tuple(m.header.origin.tolist()) == (-10.0, -10.0, -10.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mrc"]  # no temp files left


def test_write_mrc_unwritable_folder_leaves_nothing(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(InputError, match="file.txt"):
        write_mrc(blocker / "v.mrc", np.zeros((4, 4, 4)), 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_single_image_and_volume_as_stack(tmp_path):
    img = np.arange(12, dtype=np.float32).reshape(3, 4)
    with mrcfile.new(tmp_path / "one.mrc") as m:
        m.set_data(img)
    st = open_stack(tmp_path / "one.mrc")
    assert st.shape == (1, 3, 4)
    np.testing.assert_array_equal(st[0], img)
    vol = np.random.default_rng(1).normal(size=(5, 6, 6)).astype(np.float32)
    write_mrc(tmp_path / "vol.mrc", vol, 1.0)  # header says volume (ispg 1)
    st = open_stack(tmp_path / "vol.mrc")
    assert st.shape == (5, 6, 6)
    np.testing.assert_array_equal(st[2], vol[2])
    write_stack(tmp_path / "s.mrcs", vol, 1.5)
    with mrcfile.open(tmp_path / "s.mrcs") as m:
        assert m.is_image_stack() and m.voxel_size.x == pytest.approx(1.5)


def test_int16_big_endian_stack(tmp_path):
    imgs = np.arange(2 * 4 * 4, dtype=np.int16).reshape(2, 4, 4)
    path = tmp_path / "be.mrcs"
    with mrcfile.new(path) as m:
        m.set_data(imgs.astype(">i2"))
    st = open_stack(path)
    np.testing.assert_array_equal(np.asarray(st, np.float32), imgs.astype(np.float32))


def test_truncated_stack_is_input_error(tmp_path):
    path = tmp_path / "t.mrcs"
    write_stack(path, np.zeros((4, 8, 8)), 1.0)
    with open(path, "r+b") as f:
        f.truncate(1024 + 8 * 8 * 4 * 2)
    with pytest.raises(InputError, match="truncated"):
        open_stack(path)
