"""The Python-side copies of the activation / dtype codes match csrc/common/codes.h exactly."""

import pytest
import torch

from emcad_kernels.ops._args import ACTIVATIONS, FLOAT_DTYPES
from native_codes import activation_codes, define, dtype_codes, leaky_slope


def test_header_parse_is_complete():
    assert sorted(activation_codes()) == sorted(ACTIVATIONS)
    assert sorted(activation_codes().values()) == list(range(len(ACTIVATIONS)))
    assert set(dtype_codes()) == set(FLOAT_DTYPES)
    # the CPU kernel tables are indexed by the codes of their three dtypes
    assert [dtype_codes()[d] for d in (torch.float32, torch.float64, torch.bfloat16)] == [0, 1, 2]
    assert leaky_slope() == 0.2
    # the CUDA launchers' range checks use the counts
    assert int(define("EMCAD_ACT_COUNT")) == len(activation_codes())
    assert int(define("EMCAD_DTYPE_COUNT")) == len(dtype_codes())


def test_triton_activation_codes_match_the_header():
    pytest.importorskip("triton")
    from emcad_kernels.triton import _utils

    assert _utils.ACTIVATION_CODES == activation_codes()
    assert _utils.LEAKY_SLOPE.value == leaky_slope()
