import numpy as np
import pytest

from distill.data.token_store import TokenStore, TokenStoreWriter, token_dtype
from distill.errors import DataError


def test_roundtrip_and_o1_reads(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 60000, size=(50, 9))
    writer = TokenStoreWriter(tmp_path / "s", 9, token_dtype(60000))
    writer.append(data[:20])
    writer.append(data[20:])
    writer.close()
    store = TokenStore(tmp_path / "s")
    assert len(store) == 50 and store.dtype == np.uint16
    assert isinstance(store._map(), np.memmap)  # read through a memory map, not loaded
    for i in (0, 17, 49, -1):
        np.testing.assert_array_equal(store[i], data[i])
    np.testing.assert_array_equal(store.batch(np.array([3, 1, 3])), data[[3, 1, 3]])
    with pytest.raises(IndexError):
        store[50]


def test_large_vocabulary_uses_uint32(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    data = np.array([[0, 151935, 262143]])
    writer = TokenStoreWriter(tmp_path / "s", 3, token_dtype(262144))
    writer.append(data)
    writer.close()
    np.testing.assert_array_equal(TokenStore(tmp_path / "s")[0], data[0])


def test_truncated_store_is_refused(tmp_path):
    writer = TokenStoreWriter(tmp_path / "s", 4, token_dtype(100))
    writer.append(np.ones((3, 4), dtype=np.int64))
    writer.close()
    with open(tmp_path / "s.bin", "r+b") as f:
        f.truncate(20)
    with pytest.raises(DataError, match="incomplete"):
        TokenStore(tmp_path / "s")


def test_resume_truncates_to_committed_sequences(tmp_path):
    writer = TokenStoreWriter(tmp_path / "s", 4, token_dtype(100))
    writer.append(np.full((2, 4), 7))
    writer.flush()
    writer.append(np.full((1, 4), 9))  # written after the last commit: must disappear on resume
    writer.flush()
    resumed = TokenStoreWriter(tmp_path / "s", 4, token_dtype(100), resume_sequences=2)
    resumed.append(np.full((1, 4), 5))
    resumed.close()
    store = TokenStore(tmp_path / "s")
    assert len(store) == 3
    np.testing.assert_array_equal(store[2], [5, 5, 5, 5])
