from pathlib import Path

import h5py
import numpy as np
import pytest

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.features.store import COMMITTED, FeatureStore, extractor_id

EXTRACTOR = {"backbone": "timm/x", "layers": ["a", "b"], "dtype": "float16"}
DIMS = {"a": 4, "b": 2}


def _codes(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=(n, d)).astype(np.float16) for k, d in DIMS.items()}


def test_round_trip_in_any_key_order(tmp_path: Path):
    path = tmp_path / "s.h5"
    a, b = _codes(3, 0), _codes(2, 1)
    with FeatureStore.create(path, EXTRACTOR, DIMS, "float16") as store:
        store.append(["k0", "k1", "k2"], a)
        store.append(["k3", "k4"], b)
    with FeatureStore(path) as store:
        assert store.keys() == ["k0", "k1", "k2", "k3", "k4"]
        assert store.layers == DIMS
        assert store.extractor == EXTRACTOR
        assert store.versions["h5py"] == h5py.__version__
        got = store.read("a", ["k4", "k0"])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.vstack([b["a"][1], a["a"][0]]).astype(np.float32))


def test_rows_past_the_counter_are_not_trusted(tmp_path: Path):
    path = tmp_path / "s.h5"
    with FeatureStore.create(path, EXTRACTOR, DIMS, "float16") as store:
        store.append(["k0", "k1"], _codes(2, 0))
    with h5py.File(path, "a") as h5:  # a writer died after resizing, before committing
        h5.attrs[COMMITTED] = 1
    with FeatureStore(path) as store:
        assert store.keys() == ["k0"]
        with pytest.raises(TlflowError, match=r"1 image\(s\) have no codes, e\.g\. k1"):
            store.read("a", ["k1"])
    with FeatureStore.create(path, EXTRACTOR, DIMS, "float16") as store:
        store.append(["k1"], _codes(1, 5))  # the next batch overwrites the torn row
        assert store.keys() == ["k0", "k1"]


def test_another_extractor_is_refused(tmp_path: Path):
    path = tmp_path / "s.h5"
    FeatureStore.create(path, EXTRACTOR, DIMS, "float16").close()
    with pytest.raises(TlflowError, match="codes of another extractor"):
        FeatureStore.create(path, {**EXTRACTOR, "dtype": "float32"}, DIMS, "float32")


def test_unknown_layer_and_missing_or_corrupt_file(tmp_path: Path):
    with pytest.raises(TlflowError, match="feature store not found"):
        FeatureStore(tmp_path / "none.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(TlflowError, match="not a readable HDF5"):
        FeatureStore(bad)
    path = tmp_path / "s.h5"
    FeatureStore.create(path, EXTRACTOR, DIMS, "float16").close()
    with FeatureStore(path) as store, pytest.raises(TlflowError, match="no layer 'c'"):
        store.read("c", [])


def test_extractor_id_is_canonical():
    assert extractor_id({"a": 1, "b": [2]}) == extractor_id({"b": [2], "a": 1})
    assert extractor_id({"a": 1}) != extractor_id({"a": 2})


def test_a_few_rows_are_read_alone_and_agree_with_a_full_read(tmp_path: Path):
    path = tmp_path / "s.h5"
    codes = _codes(100, 3)
    keys = [f"k{i}" for i in range(100)]
    with FeatureStore.create(path, EXTRACTOR, DIMS, "float16") as store:
        store.append(keys, codes)
    with FeatureStore(path) as store:
        few = ["k70", "k3", "k70", "k99"]  # below a quarter of the rows: read alone
        np.testing.assert_array_equal(store.read("a", few),
                                      codes["a"][[70, 3, 70, 99]].astype(np.float32))
        np.testing.assert_array_equal(store.read("b", keys[::-1]),
                                      codes["b"][::-1].astype(np.float32))
        assert store.read("a", []).shape == (0, 4)


def test_flipped_bytes_are_detected_not_learned_from(tmp_path: Path):
    """Every chunk carries a Fletcher-32 checksum: a flipped byte in the codes is one line
    naming the store and the repair, from read, blocks and verify alike."""
    path = tmp_path / "s.h5"
    rng = np.random.default_rng(0)
    keys = [f"{i:064x}" for i in range(600)]
    with FeatureStore.create(path, {"x": 1}, {"pooled": 16}, "float16") as store:
        store.append(keys, {"pooled": rng.normal(size=(600, 16)).astype(np.float16)})
        assert store.verify() == []
        offset = store._h5["layers/pooled"].id.get_chunk_info(1).byte_offset
    data = bytearray(path.read_bytes())
    data[offset + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    with FeatureStore(path) as store:
        assert store.verify() == ["layers/pooled"]
        assert store.read("pooled", keys[:10]).shape == (10, 16)  # chunk 0 is whole
        with pytest.raises(TlflowError, match=r"s.h5: damaged .*tlflow features verify"):
            store.read("pooled", keys[300:310])
        with pytest.raises(TlflowError, match="damaged"):
            list(store.blocks("pooled", rows=256))


def test_a_create_cut_before_its_attributes_starts_anew_and_readers_refuse_it(tmp_path: Path):
    """A create killed after its datasets, before its attributes: a reader finds it damaged
    (one line, no KeyError); the next create drops what was left and fills it."""
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("keys", (0,), dtype="S64", maxshape=(None,))
        h5.create_dataset("layers/a", (0, 4), dtype="float16", maxshape=(None, 4))
    with pytest.raises(TlflowError, match=r"s.h5: damaged structure \(missing attribute"):
        FeatureStore(path)
    with FeatureStore.create(path, EXTRACTOR, DIMS, "float16") as store:
        store.append(["k0"], _codes(1, 0))
    with FeatureStore(path) as store:
        assert store.keys() == ["k0"] and store.layers == DIMS
