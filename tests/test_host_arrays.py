"""Aligned host arrays: the JAX CPU device adopts them without a copy."""

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from gemma3n.checkpoints.safetensors_files import SafetensorsFiles
from gemma3n.host_arrays import DEVICE_ALIGNMENT, aligned_copy, aligned_empty, to_device


def test_aligned_arrays_are_adopted_and_others_copied():
    x = aligned_empty((3, 5), ml_dtypes.bfloat16)
    assert x.ctypes.data % DEVICE_ALIGNMENT == 0 and x.flags.c_contiguous and x.dtype == ml_dtypes.bfloat16
    x[:] = np.arange(15).reshape(3, 5)
    on_device = to_device(x)
    assert on_device.unsafe_buffer_pointer() == x.ctypes.data          # no copy
    np.testing.assert_array_equal(np.asarray(on_device), x)

    strided = np.arange(24, dtype=np.float32).reshape(4, 6).T          # not C-contiguous
    copy = aligned_copy(strided)
    assert copy is not strided and copy.ctypes.data % DEVICE_ALIGNMENT == 0
    np.testing.assert_array_equal(copy, strided)
    assert aligned_copy(copy) is copy
    np.testing.assert_array_equal(np.asarray(to_device(strided)), strided)


def test_safetensors_reads_land_aligned(tmp_path):
    tensors = {'a': np.arange(7, dtype=np.float32), 'b': np.ones((3, 3), ml_dtypes.bfloat16),
               'c': np.array(2.5, np.float32)}
    save_file(tensors, str(tmp_path / 'x.safetensors'))
    files = SafetensorsFiles([tmp_path / 'x.safetensors'])
    for key, expected in tensors.items():
        got = files.read(key)
        assert got.ctypes.data % DEVICE_ALIGNMENT == 0 and got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
