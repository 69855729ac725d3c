"""Unsigned integers (uint16/32/64 carried as int64, kfuse/capture/onnx_ops/unsigned.py) and the
bitwise ops, against numpy over values that reach the top bit, where a signed carrier would go wrong."""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

import kfuse

ELEM = {np.uint8: TensorProto.UINT8, np.uint16: TensorProto.UINT16, np.uint32: TensorProto.UINT32,
        np.uint64: TensorProto.UINT64, np.int8: TensorProto.INT8, np.int32: TensorProto.INT32,
        np.int64: TensorProto.INT64}


def _run(tmp_path, op, dtype, out_elem=None, n_in=2, values=None, **attrs):
    elem = ELEM[dtype]
    names = ["a", "b"][:n_in]
    node = helper.make_node(op, names, ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(x, elem, [64]) for x in names],
                              [helper.make_tensor_value_info("y", out_elem or elem, [64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    xs = values or [rng.integers(info.min, info.max, 64, dtype=dtype, endpoint=True) for _ in names]
    xs = [np.concatenate([x[:60], np.array([info.max, info.min, 1, info.max // 2 + 1], dtype=dtype)]) for x in xs]
    if op in ("Div", "Mod"):
        xs[1][xs[1] == 0] = 1
    ins = [torch.from_numpy(x) for x in xs]
    got = kfuse.compile(path, ins)(*ins)
    return xs, got.numpy()


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64])
@pytest.mark.parametrize("op,fn", [("Add", np.add), ("Sub", np.subtract), ("Mul", np.multiply),
                                   ("Div", np.floor_divide), ("Mod", np.mod), ("Max", np.maximum), ("Min", np.minimum)])
def test_arithmetic(tmp_path, dtype, op, fn):
    (a, b), got = _run(tmp_path, op, dtype)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(got, fn(a, b))


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("op,fn", [("Less", np.less), ("GreaterOrEqual", np.greater_equal), ("Equal", np.equal)])
def test_compare(tmp_path, dtype, op, fn):
    (a, b), got = _run(tmp_path, op, dtype, out_elem=TensorProto.BOOL)
    np.testing.assert_array_equal(got, fn(a, b))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int8, np.int32, np.uint64, np.int64])
@pytest.mark.parametrize("op,fn", [("BitwiseAnd", np.bitwise_and), ("BitwiseOr", np.bitwise_or),
                                   ("BitwiseXor", np.bitwise_xor), ("BitwiseNot", np.invert)])
def test_bitwise(tmp_path, dtype, op, fn):
    n_in = 1 if op == "BitwiseNot" else 2
    xs, got = _run(tmp_path, op, dtype, n_in=n_in)
    np.testing.assert_array_equal(got, fn(*xs))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint32, np.uint64, np.int8, np.int64])
@pytest.mark.parametrize("direction", ["LEFT", "RIGHT"])
def test_bitshift(tmp_path, dtype, direction):
    bits = np.iinfo(dtype).bits
    rng = np.random.default_rng(1)
    x = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, 64, dtype=dtype, endpoint=True)
    y = np.arange(64, dtype=dtype) % (bits + 2)
    (x, y), got = _run(tmp_path, "BitShift", dtype, values=[x, y], direction=direction)
    ok = y < bits
    want = np.where(ok, (np.left_shift if direction == "LEFT" else np.right_shift)(x, np.where(ok, y, 0)), 0)
    if direction == "RIGHT" and np.issubdtype(dtype, np.signedinteger):
        want = np.where(ok, want, np.where(x < 0, -1, 0))
    np.testing.assert_array_equal(got, want.astype(dtype))


def test_cast_uint64_to_float_is_a_clear_error(tmp_path):
    with pytest.raises(kfuse.KfuseError, match="uint64 to a float"):
        _run(tmp_path, "Cast", np.uint64, out_elem=TensorProto.FLOAT, n_in=1, to=TensorProto.FLOAT)
