"""Message <-> numpy conversions: for any input, either a correct array or a clear ValueError.

Property-based (hypothesis) over random shapes, encodings, steps, names and NaNs; no DDS
needed, only the generated message classes (run under ``eval "$(m2vla env)"`` like the suite).
"""

from __future__ import annotations

import array

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sensor_msgs.msg import Image, JointState

from m2vla_msgs.msg import ActionChunk, FeatureContract, LayerFeatures
from m2vla_ros.conversions import (
    IMAGE_ENCODINGS, ConversionError, arrival_monotonic, array_to_image, array_to_joint_state, chunk_to_msg,
    contract_to_msg, diagnostic_array, diagnostic_values, hidden_to_msg, image_to_array, image_to_rgb,
    joint_state_to_array, msg_to_chunk, msg_to_features, ns_to_stamp,
)

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CODES = {"bad_shape", "bad_encoding", "too_large", "non_finite", "bad_names", "unsupported", "mismatch", "bad_dtype"}


def assert_clear(exc: ValueError) -> None:
    assert isinstance(exc, ConversionError) and exc.code in CODES and str(exc).startswith(exc.code + ": ")


# ----------------------------------------------------------------------------- images
@st.composite
def raw_images(draw):
    """Images whose fields are individually valid ROS values but may disagree with each other."""
    encoding = draw(st.sampled_from([*IMAGE_ENCODINGS, "RGB8", "yuv422", "32FC1", "", "bgr16"]))
    height, width = draw(st.integers(0, 9)), draw(st.integers(0, 9))
    channels, dtype = IMAGE_ENCODINGS.get(encoding.lower(), (3, np.dtype(np.uint8)))
    row = width * channels * dtype.itemsize
    step = max(0, row + draw(st.integers(-3, 5)))
    size = max(0, step * height + draw(st.sampled_from([0, 0, 0, -1, 1, 7])))
    data = draw(st.binary(min_size=size, max_size=size))
    return Image(height=height, width=width, encoding=encoding, step=step, data=array.array("B", data),
                 is_bigendian=draw(st.integers(0, 1)))


def reference_pixels(msg: Image) -> np.ndarray:
    """Independent decoding, pixel by pixel, for the valid case."""
    channels, dtype = IMAGE_ENCODINGS[msg.encoding.lower()]
    data = bytes(msg.data)
    out = np.zeros((msg.height, msg.width, channels), dtype=dtype)
    size = dtype.itemsize
    for r in range(msg.height):
        for c in range(msg.width):
            for k in range(channels):
                off = r * msg.step + (c * channels + k) * size
                out[r, c, k] = int.from_bytes(data[off:off + size], "big" if (msg.is_bigendian and size > 1) else "little")
    return out


@SETTINGS
@given(msg=raw_images())
def test_image_to_array_returns_the_exact_pixels_or_a_clear_error(msg):
    try:
        arr = image_to_array(msg, max_pixels=64)
    except ValueError as exc:
        assert_clear(exc)
        valid = (msg.encoding.lower() in IMAGE_ENCODINGS and 0 < msg.height * msg.width <= 64 and msg.height > 0
                 and msg.step >= msg.width * np.prod(IMAGE_ENCODINGS[msg.encoding.lower()][0])
                 * IMAGE_ENCODINGS[msg.encoding.lower()][1].itemsize and len(msg.data) == msg.step * msg.height)
        assert not valid, f"valid image refused: {exc}"
        return
    expected = reference_pixels(msg)
    np.testing.assert_array_equal(arr.reshape(expected.shape), expected)
    rgb = image_to_rgb(msg, max_pixels=64)
    assert rgb.shape == (msg.height, msg.width, 3) and rgb.dtype == np.uint8


@SETTINGS
@given(rgb=hnp.arrays(np.uint8, st.tuples(st.integers(1, 6), st.integers(1, 6), st.just(3))),
       encoding=st.sampled_from(["rgb8", "bgr8", "rgba8", "bgra8"]))
def test_colour_encodings_all_decode_to_the_same_rgb(rgb, encoding):
    channels = rgb[:, :, ::-1] if encoding.startswith("bgr") else rgb
    if encoding.endswith("a8"):
        channels = np.concatenate([channels, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    msg = array_to_image(np.ascontiguousarray(channels), encoding)
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)


def test_mono16_honours_endianness_and_keeps_the_high_byte_for_rgb():
    value = 0xAB12
    little = Image(height=1, width=2, encoding="mono16", step=4, is_bigendian=0, data=bytes([0x12, 0xAB] * 2))
    big = Image(height=1, width=2, encoding="mono16", step=4, is_bigendian=1, data=bytes([0xAB, 0x12] * 2))
    for msg in (little, big):
        assert image_to_array(msg).tolist() == [[value, value]]
        assert image_to_rgb(msg)[0, 0].tolist() == [0xAB] * 3


def test_an_8k_frame_is_refused_before_its_data_is_touched():
    msg = Image(height=4320, width=7680, encoding="rgb8", step=7680 * 3)  # no data at all
    with pytest.raises(ValueError, match="too_large"):
        image_to_rgb(msg, max_pixels=3840 * 2160)


def test_row_padding_is_dropped():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    padded = np.zeros((2, 12), np.uint8)
    padded[:, :9] = rgb.reshape(2, 9)
    msg = Image(height=2, width=3, encoding="rgb8", step=12, data=padded.tobytes())
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)


# ----------------------------------------------------------------------------- joint states
NAMES = ["j1", "j2", "j3", "panda_finger_joint1", "panda_finger_joint2"]
values = st.floats(allow_nan=True, allow_infinity=True, width=64)


@SETTINGS
@given(names=st.lists(st.sampled_from(NAMES + ["extra", "j1"]), max_size=7), data=st.data(),
       wanted=st.lists(st.sampled_from(["j1", "j2", "j3", "gripper_opening"]), unique=True, min_size=1))
def test_joint_state_by_name_returns_the_named_values_or_a_clear_error(names, data, wanted):
    n_pos = data.draw(st.sampled_from([len(names), len(names), max(0, len(names) - 1), len(names) + 1]))
    positions = data.draw(st.lists(values, min_size=n_pos, max_size=n_pos))
    msg = JointState(name=names, position=positions)
    try:
        out = joint_state_to_array(msg, wanted)
    except ValueError as exc:
        assert_clear(exc)
        return
    assert len(names) == len(positions) and len(set(names)) == len(names)
    lookup = dict(zip(names, positions))
    for name, got in zip(wanted, out):
        expected = (lookup["panda_finger_joint1"] + lookup["panda_finger_joint2"]
                    if name == "gripper_opening" and name not in lookup else lookup[name])
        assert got == expected and np.isfinite(got)


def test_joint_state_round_trip_and_extra_names_ignored():
    msg = array_to_joint_state(["a", "b", "c"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(joint_state_to_array(msg, ["c", "a"]), [3.0, 1.0])
    with pytest.raises(ValueError, match="bad_names: JointState lacks \\['z'\\]"):
        joint_state_to_array(msg, ["a", "z"])


# ----------------------------------------------------------------------------- action chunks
@SETTINGS
@given(horizon=st.integers(0, 5), dim=st.integers(0, 4), extra=st.sampled_from([0, 0, 0, -1, 1]),
       data=st.data(), dt=st.sampled_from([0.05, 0.0, -1.0, float("nan"), float("inf")]),
       space=st.sampled_from([ActionChunk.ACTION_SPACE_JOINT, ActionChunk.ACTION_SPACE_JOINT, ActionChunk.ACTION_SPACE_EEF]))
def test_chunk_messages_convert_to_the_right_matrix_or_a_clear_error(horizon, dim, extra, data, dt, space):
    names = data.draw(st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), min_size=dim, max_size=dim))
    flat = data.draw(st.lists(st.floats(width=32, allow_nan=True), min_size=max(0, horizon * dim + extra),
                              max_size=max(0, horizon * dim + extra)))
    msg = ActionChunk(action_space=space, names=names, horizon=horizon, dim=dim, dt=dt, values=flat, sequence_id=3)
    wanted = list(reversed(names))
    try:
        fields = msg_to_chunk(msg, wanted)
    except ValueError as exc:
        assert_clear(exc)
        return
    expected = np.asarray(flat, np.float32).astype(np.float64).reshape(horizon, dim)  # (H, A)
    np.testing.assert_array_equal(fields.values, expected[:, ::-1])
    assert fields.names == tuple(wanted) and fields.sequence_id == 3 and fields.dt_s == dt > 0


def test_chunk_round_trip_keeps_values_stamps_and_ids():
    chunk = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    msg = chunk_to_msg(chunk, names=["x", "y", "z"], dt_s=0.1, stamp=Time(sec=5), observation_stamp=Time(sec=4, nanosec=7),
                       sequence_id=9, instruction_id=2)
    fields = msg_to_chunk(msg, ["z", "x", "y"])
    np.testing.assert_array_equal(fields.values, chunk[:, [2, 0, 1]])
    assert (fields.observation_stamp_ns, fields.sequence_id, fields.instruction_id) == (4_000_000_007, 9, 2)
    with pytest.raises(ValueError, match="bad_names"):
        msg_to_chunk(msg, ["x", "y"])


# ----------------------------------------------------------------------------- layer features
class Contract:
    def __init__(self, layers=(0, 2), n_img=3, n_txt=2, width=4, dtype="float32"):
        self.layers, self.num_image_tokens, self.num_text_tokens, self.width, self.dtype = layers, n_img, n_txt, width, dtype


@SETTINGS
@given(dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
       hidden=hnp.arrays(np.float32, (2, 5, 4), elements=st.floats(-100, 100, width=32)),
       mask=hnp.arrays(np.bool_, 5))
def test_features_round_trip_within_the_wire_dtype_precision(dtype, hidden, mask):
    contract = Contract(dtype=dtype)
    msg = hidden_to_msg(hidden, mask, contract, instruction_id=4)
    got, got_mask = msg_to_features(msg, contract)
    assert got.dtype == np.float32 and got.shape == (2, 5, 4)
    rtol = {"float32": 0, "float16": 1e-3, "bfloat16": 8e-3}[dtype]
    np.testing.assert_allclose(got, hidden, rtol=rtol, atol=1e-3 if dtype == "float16" else 1e-30)
    np.testing.assert_array_equal(got_mask, mask)


def test_features_computed_at_another_input_size_are_refused_by_the_head():
    from m2vla_core.features import FeatureContract as CoreContract

    head = CoreContract(layers=(0, 2), num_image_tokens=3, num_text_tokens=2, width=4, image_size=448)
    hidden, mask = np.ones((2, 5, 4), np.float32), np.ones(5, bool)
    stale = hidden_to_msg(hidden, mask, CoreContract(layers=(0, 2), num_image_tokens=3, num_text_tokens=2, width=4))
    with pytest.raises(ConversionError, match="image size 0.*image size 448"):
        msg_to_features(stale, head)  # e.g. perception still at 224 px right after a head swap
    got, _ = msg_to_features(hidden_to_msg(hidden, mask, head), head)
    np.testing.assert_array_equal(got, hidden)


@SETTINGS
@given(cut=st.integers(-9, 9), dtype=st.sampled_from(["float32", "float16", "bfloat16", "float64", "int8", ""]),
       layers=st.sampled_from([[0, 2], [2, 0], [], [0, 2, 3], [1, 1]]), mask_len=st.integers(3, 7),
       mask_value=st.sampled_from([0, 1, 2]), width=st.sampled_from([4, 3]), nan=st.booleans())
def test_features_of_the_wrong_size_dtype_or_contents_are_refused(cut, dtype, layers, mask_len, mask_value, width, nan):
    contract = Contract()
    itemsize = {"float16": 2, "bfloat16": 2}.get(dtype, 4)
    n = len(layers) * 5 * width
    payload = np.ones(n, np.float32)
    if nan and n:
        payload[0] = np.nan
    raw = payload.tobytes() if itemsize == 4 else payload.astype(np.float16).tobytes()
    raw = raw[:max(0, len(raw) + cut)] if cut < 0 else raw + bytes(cut)
    msg = LayerFeatures(layers=layers, num_image_tokens=3, num_text_tokens=2, width=width, dtype=dtype,
                        mask=bytes([mask_value] * mask_len), data=raw)
    ok = (cut == 0 and dtype == "float32" and layers == [0, 2] and mask_len == 5 and mask_value < 2 and width == 4
          and not nan)
    for c in (contract, None):
        try:
            hidden, _ = msg_to_features(msg, c)
        except ValueError as exc:
            assert_clear(exc)
            if c is contract:
                assert not ok, exc
            continue
        assert hidden.shape == (len(layers), 5, width) and np.isfinite(hidden).all()
        if c is contract:
            assert ok


def test_contract_messages_convert_both_ways():
    from m2vla_ros.conversions import contract_from_msg

    core = contract_from_msg(FeatureContract(layers=[1, 3], num_image_tokens=4, num_text_tokens=2, width=8,
                                             dtype="bfloat16"))
    assert core.shape == (2, 6, 8)
    back = contract_to_msg(core)
    assert list(back.layers) == [1, 3] and back.dtype == "bfloat16" and back.image_size == 0
    sized = contract_from_msg(FeatureContract(layers=[1], num_image_tokens=4, num_text_tokens=2, width=8,
                                              dtype="float32", image_size=448))
    assert sized.image_size == 448 and contract_to_msg(sized).image_size == 448
    with pytest.raises(ValueError, match="strictly increasing"):
        contract_from_msg(FeatureContract(layers=[3, 1], num_image_tokens=4, num_text_tokens=2, width=8,
                                          dtype="float32"))


def test_a_message_is_aged_from_when_dds_received_it_not_from_when_the_executor_took_it():
    clocks = {"now_monotonic": 100.0, "now_wall_ns": 5_000_000_000}
    waited = {"received_timestamp": 3_500_000_000}  # sat 1.5 s in the reader queue
    assert arrival_monotonic(waited, **clocks) == pytest.approx(98.5)
    for unknown in (None, {}, {"received_timestamp": 0}):  # an rmw that does not say: the take time
        assert arrival_monotonic(unknown, **clocks) == 100.0
    stepped_back = {"received_timestamp": 6_000_000_000}  # wall clock jumped back: never "younger" than now
    assert arrival_monotonic(stepped_back, **clocks) == 100.0


def test_a_diagnostics_status_reads_back_as_its_message_and_text_values():
    array = diagnostic_array("m2vla_policy", "onnxruntime", 0, "ok", {"chunks_published": 3, "state": "RUNNING"},
                             ns_to_stamp(0))
    assert diagnostic_values(array.status[0]) == {"message": "ok", "chunks_published": "3", "state": "RUNNING"}
