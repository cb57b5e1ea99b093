"""Property-based tests of every boundary between the network and the arm (pure functions).

Whatever arrives on a topic, the conversion and validation functions the nodes call either
return a well-formed array or refuse with a coded reason (ConversionError / InstructionError /
a ``"code: detail"`` string), and the command stream built from any mix of good and bad input
stays inside the joint limits, never jumps, and never moves on bad input alone.
"""

from __future__ import annotations

import array
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sensor_msgs.msg import Image, JointState

from m2vla_core.control import (
    PANDA_JOINT_NAMES, PANDA_LIMITS, Chunk, ChunkStreamer, ControllerConfig, check_chunk_values, check_joint_positions,
)
from m2vla_core.instructions import InstructionError, clean_instruction
from m2vla_core.perception import PerceptionConfig, PerceptionEngine
from m2vla_msgs.msg import ActionChunk, LayerFeatures
from m2vla_ros.conversions import (
    IMAGE_ENCODINGS, ConversionError, Rejections, image_to_rgb, joint_state_to_array, msg_to_chunk, msg_to_features,
    reason_code, short,
)

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CODE_CHARS = set("abcdefghijklmnopqrstuvwxyz_")
INSTRUCTION_CODES = {"not_text", "too_long", "undecodable", "control_chars", "empty", "no_words"}
NAMES = list(PANDA_JOINT_NAMES)  # 7 arm joints + gripper_opening
SIM_NAMES = NAMES[:7] + ["panda_finger_joint1", "panda_finger_joint2"]
LOWER, UPPER = np.asarray(PANDA_LIMITS.lower), np.asarray(PANDA_LIMITS.upper)
VMAX = np.asarray(PANDA_LIMITS.velocity)
HOME = np.array([0.0, -0.35, 0.0, -2.3, 0.0, 1.95, 0.785, 0.04])

any_float = st.floats(allow_nan=True, allow_infinity=True, width=64)


def _has_code(exc: Exception) -> bool:
    code = str(exc).split(":", 1)[0]
    return bool(code) and set(code) <= CODE_CHARS


# ------------------------------------------------------------------------------------ images
@st.composite
def arbitrary_images(draw) -> Image:
    """Image messages whose fields need not agree with each other (the camera driver may be broken)."""
    encoding = draw(st.one_of(st.sampled_from(sorted(IMAGE_ENCODINGS)), st.sampled_from(["RGB8", " bgr8 "]),
                              st.text(max_size=12)))
    height, width = draw(st.integers(-2, 40)), draw(st.integers(-2, 40))
    step = draw(st.integers(0, 200))
    size = draw(st.one_of(st.just(max(step, 0) * max(height, 0)), st.integers(0, 4000)))
    msg = Image(height=max(height, 0), width=max(width, 0), encoding=encoding, step=step,
                is_bigendian=draw(st.integers(0, 1)))
    msg.data = array.array("B", draw(st.binary(min_size=size, max_size=size)))
    return msg


@PROPERTY
@given(msg=arbitrary_images())
def test_any_image_message_becomes_an_rgb_frame_or_a_coded_refusal(msg):
    engine = PerceptionEngine(PerceptionConfig())
    try:
        rgb = image_to_rgb(msg)
        engine.check_image(rgb)
    except ValueError as exc:
        assert _has_code(exc), str(exc)
        return
    assert rgb.shape == (msg.height, msg.width, 3) and rgb.dtype == np.uint8
    assert min(rgb.shape[:2]) >= engine.config.min_image_side_px


@pytest.mark.parametrize("height, width, encoding, step_extra, data_extra, code", [
    (0, 0, "rgb8", 0, 0, "bad_shape"),  # zero size
    (4320, 7680, "rgb8", 0, -(4320 * 7680 * 3 - 10), "too_large"),  # 8K: refused before the data is read
    (32, 32, "yuv422_yuy2", 0, 0, "bad_encoding"),  # an encoding we do not convert
    (32, 32, "rgb8", -1, 0, "bad_shape"),  # step smaller than a row
    (32, 32, "rgb8", 4, -4, "bad_shape"),  # step and data length disagree
    (32, 32, "rgb8", 0, 1, "bad_shape"),  # one byte too many
    (2, 2, "rgb8", 0, 0, "bad_image"),  # a 2x2 "frame" carries nothing
    (8, 400, "mono8", 0, 0, "bad_image"),  # 50:1 sensor garbage
])
def test_each_kind_of_bad_image_is_refused_with_its_code(height, width, encoding, step_extra, data_extra, code):
    channels = IMAGE_ENCODINGS.get(encoding, (3, np.dtype(np.uint8)))[0]
    step = width * channels + step_extra
    msg = Image(height=height, width=width, encoding=encoding, step=max(step, 0))
    msg.data = array.array("B", bytes(max(step * height + data_extra, 0)))
    engine = PerceptionEngine(PerceptionConfig())
    with pytest.raises(ValueError) as info:
        engine.check_image(image_to_rgb(msg, max_pixels=3840 * 2160))
    assert reason_code(str(info.value)) == code, str(info.value)


# ------------------------------------------------------------------------------------ joint states
@PROPERTY
@given(names=st.lists(st.sampled_from(SIM_NAMES + ["gripper_opening", "other_joint", ""]), max_size=12),
       data=st.data())
def test_any_joint_state_gives_the_named_finite_positions_or_a_coded_refusal(names, data):
    n_pos = data.draw(st.one_of(st.just(len(names)), st.integers(0, 14)))
    positions = data.draw(st.lists(any_float, min_size=n_pos, max_size=n_pos))
    msg = JointState(name=names, position=positions)
    try:
        q = joint_state_to_array(msg, NAMES)
    except ConversionError as exc:
        assert _has_code(exc)
        return
    assert q.shape == (8,) and np.isfinite(q).all()
    index = {n: i for i, n in enumerate(names)}
    for k, name in enumerate(NAMES[:7]):
        assert q[k] == positions[index[name]]  # by name, whatever the order and extra joints
    if "gripper_opening" in index:
        assert q[7] == positions[index["gripper_opening"]]
    else:
        assert q[7] == positions[index["panda_finger_joint1"]] + positions[index["panda_finger_joint2"]]


@pytest.mark.parametrize("names, positions, code", [
    (NAMES[:6], [0.0] * 6, "bad_names"),  # missing joints
    (NAMES + ["panda_joint1"], [0.0] * 9, "bad_names"),  # a name twice
    (NAMES, [0.0] * 7, "bad_shape"),  # fewer positions than names
    (NAMES, [0.0] * 9, "bad_shape"),  # more positions than names
    (NAMES, [0.0] * 6 + [math.nan, 0.0], "non_finite"),
    (NAMES, [math.inf] + [0.0] * 7, "non_finite"),
])
def test_each_kind_of_bad_joint_state_is_refused_with_its_code(names, positions, code):
    with pytest.raises(ConversionError) as info:
        joint_state_to_array(JointState(name=names, position=positions), NAMES)
    assert info.value.code == code


def test_extra_joints_are_ignored_even_when_their_values_are_garbage():
    msg = JointState(name=["conveyor", *NAMES, "camera_pan"], position=[math.nan, *HOME, math.inf])
    np.testing.assert_array_equal(joint_state_to_array(msg, NAMES), HOME)


# ------------------------------------------------------------------------------------ action chunks
def _as_float32(value: float) -> float:
    """What a float32 message field holds for ``value`` (huge values become inf, as on the wire)."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


@st.composite
def arbitrary_chunks(draw) -> ActionChunk:
    horizon, dim = draw(st.integers(0, 6)), draw(st.integers(0, 9))
    names = draw(st.one_of(st.permutations(NAMES).map(list), st.lists(st.sampled_from(NAMES + ["x"]), max_size=9)))
    n_values = draw(st.one_of(st.just(horizon * dim), st.integers(0, 60)))
    values = draw(st.lists(st.one_of(st.floats(-4.0, 4.0, width=32), any_float.map(_as_float32)),
                           min_size=n_values, max_size=n_values))
    msg = ActionChunk(action_space=draw(st.sampled_from([0, 0, 0, 1, 7])), names=names, horizon=horizon, dim=dim,
                      dt=draw(st.one_of(st.just(0.1), any_float)), sequence_id=draw(st.integers(0, 2**64 - 1)))
    msg.values = array.array("f", values)
    return msg


@PROPERTY
@given(msg=arbitrary_chunks())
def test_any_chunk_message_converts_in_controller_order_or_is_refused_with_a_code(msg):
    config = ControllerConfig(joint_names=tuple(NAMES), limits=PANDA_LIMITS)
    try:
        fields = msg_to_chunk(msg, NAMES)
    except ConversionError as exc:
        assert _has_code(exc)
        return
    assert fields.values.shape == (msg.horizon, 8) and np.isfinite(fields.values).all()
    assert fields.names == tuple(NAMES)
    order = [list(msg.names).index(n) for n in NAMES]
    raw = np.asarray(msg.values, dtype=np.float64).reshape(msg.horizon, msg.dim)  # (H * A,) -> (H, A)
    np.testing.assert_array_equal(fields.values, raw[:, order])
    reason = check_chunk_values(fields.values, fields.dt_s, config)  # never raises: None or a coded reason
    assert reason is None or set(reason_code(reason)) <= CODE_CHARS


@PROPERTY
@given(layers=st.lists(st.integers(0, 65535), max_size=4), n_img=st.integers(0, 5), n_txt=st.integers(0, 5),
       width=st.integers(0, 2**32 - 1), dtype=st.sampled_from(["float32", "float16", "bfloat16", "float64", "", "Ω"]),
       n_bytes=st.integers(0, 600), mask=st.binary(max_size=12))
def test_any_features_message_decodes_to_finite_features_or_is_refused_before_allocating(layers, n_img, n_txt, width,
                                                                                          dtype, n_bytes, mask):
    msg = LayerFeatures(layers=layers, num_image_tokens=n_img, num_text_tokens=n_txt, width=width, dtype=dtype)
    msg.mask = array.array("B", mask)
    msg.data = array.array("B", np.random.default_rng(n_bytes).integers(0, 256, n_bytes, dtype=np.uint8).tobytes())
    try:
        hidden, m = msg_to_features(msg)
    except ConversionError as exc:  # a 2**32-wide declaration is refused, not allocated
        assert _has_code(exc)
        return
    assert hidden.shape == (len(layers), n_img + n_txt, width) and np.isfinite(hidden).all()
    assert m.shape == (n_img + n_txt,) and m.dtype == bool


# ------------------------------------------------------------------------------------ instructions
@PROPERTY
@given(text=st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("utf-8", "replace")),
                      st.binary(max_size=60).map(lambda b: b.decode("utf-8", "surrogateescape")),
                      st.text(alphabet=" \t\n\r.,!?-", max_size=30)))
def test_any_instruction_is_clean_idempotent_text_or_a_coded_refusal(text):
    try:
        out = clean_instruction(text, max_bytes=256)
    except InstructionError as exc:
        assert exc.code in INSTRUCTION_CODES and str(exc).startswith(exc.code)
        return
    assert clean_instruction(out, max_bytes=256) == out  # normalising twice changes nothing
    assert any(c.isalnum() for c in out) and len(out.encode("utf-8")) <= 256


@pytest.mark.parametrize("text, code", [
    ("", "empty"), ("   \t \n", "empty"), ("x" * (1 << 20), "too_long"), ("ü" * 1500, "too_long"),
    ("pick up the \ufffd\ufffd cube", "undecodable"), (b"pick \xff\xfe up".decode("utf-8", "surrogateescape"), "undecodable"),
    ("pick\x1b[2J up", "control_chars"), ("pick\u202eup", "control_chars"), ("?!... --", "no_words"), (None, "not_text"),
])
def test_each_kind_of_bad_instruction_is_refused_with_its_code(text, code):
    with pytest.raises(InstructionError) as info:
        clean_instruction(text)
    assert info.value.code == code


# ------------------------------------------------------------------------------------ the command stream
CONFIG = ControllerConfig(joint_names=tuple(NAMES), limits=PANDA_LIMITS)
PERIOD = CONFIG.period_s

good_chunks = hnp.arrays(np.float64, st.tuples(st.integers(2, 6), st.just(8)), elements=st.floats(-0.3, 0.3)).map(
    lambda d: HOME + np.cumsum(d * 0.05, axis=0))  # (H, 8) inside the limits, plausible speed
bad_chunks = st.one_of(
    good_chunks.map(lambda c: np.where(np.arange(c.size).reshape(c.shape) == 3, np.nan, c)),  # NaN
    good_chunks.map(lambda c: c + 10.0),  # far outside the limits
    good_chunks.map(lambda c: c[:, :5]),  # wrong width
    good_chunks.map(lambda c: c * np.r_[np.ones(7), 50.0] + np.r_[np.zeros(7), 1.0]),  # gripper out of range
)
events = st.lists(st.one_of(
    st.tuples(st.just("chunk"), st.one_of(good_chunks, bad_chunks), st.floats(-2.0, 0.05), st.integers(0, 50)),
    st.tuples(st.just("bad_chunk"), bad_chunks, st.floats(-0.2, 0.0), st.integers(0, 50)),
    # measured noise keeps the arm inside its limits (a state beyond them: the test below)
    st.tuples(st.just("joints"), hnp.arrays(np.float64, 8, elements=st.floats(-0.03, 0.03)), st.booleans()),
    st.tuples(st.just("estop"), st.booleans()),
    st.tuples(st.just("steps"), st.integers(1, 40)),
    st.tuples(st.just("stop")),
), min_size=1, max_size=40)


def _run(streamer: ChunkStreamer, script, *, measured=HOME) -> list[np.ndarray]:
    """Play ``script`` against ``streamer`` on a simulated clock; -> every command sent."""
    t = 100.0
    streamer.update_joint_state(measured, t)
    commands = []
    for event in script:
        kind = event[0]
        if kind in ("chunk", "bad_chunk"):
            _, values, obs_offset_s, seq = event
            streamer.offer_chunk(Chunk(values, 0.1, t + obs_offset_s, seq), t)
        elif kind == "joints":
            _, noise, nan = event
            q = commands[-1] + noise if commands else measured + noise
            streamer.update_joint_state(np.where(np.arange(8) == 2, np.nan, q) if nan else q, t)
        elif kind == "estop":
            streamer.set_estop(event[1], t)
        elif kind == "stop":
            streamer.stop(t)
        else:
            for _ in range(event[1]):
                t += PERIOD
                command = streamer.step(t)
                if command.position is not None:
                    commands.append(command.position)
                if int(t / PERIOD) % 5 == 0:
                    streamer.update_joint_state(commands[-1] if commands else measured, t)  # a perfect arm
    return commands


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=events)
def test_commands_stay_in_limits_and_never_jump_whatever_the_input_sequence(script):
    streamer = ChunkStreamer(CONFIG)
    commands = _run(streamer, script)
    assume(len(commands) > 1)
    q = np.array(commands)  # (N, 8)
    assert np.isfinite(q).all()
    assert (q >= LOWER - 1e-9).all() and (q <= UPPER + 1e-9).all()
    steps = np.abs(np.diff(q, axis=0))  # (N-1, 8)
    assert (steps <= VMAX * PERIOD * (1 + 1e-6) + 1e-12).all(), f"step {steps.max(axis=0)} above vmax x period"


def test_a_measured_state_beyond_a_limit_is_left_no_faster_than_the_velocity_limit():
    streamer = ChunkStreamer(CONFIG)
    beyond = HOME.copy()
    beyond[7] = UPPER[7] + 0.007  # fingers a little over the gripper's range (sim overshoot, worn hand)
    commands = _run(streamer, [("chunk", np.tile(HOME, (3, 1)), 0.0, 0), ("steps", 20)], measured=beyond)
    steps = np.abs(np.diff(np.array([beyond, *commands]), axis=0))  # (N, 8) from the measured state on
    assert (steps <= VMAX * PERIOD * (1 + 1e-6)).all(), f"largest step {steps.max(axis=0)}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=st.lists(st.one_of(
    st.tuples(st.just("bad_chunk"), bad_chunks, st.floats(-0.2, 0.0), st.integers(0, 50)),
    st.tuples(st.just("chunk"), good_chunks, st.floats(-30.0, -1.5), st.integers(0, 50)),  # too old
    st.tuples(st.just("chunk"), good_chunks, st.floats(0.2, 5.0), st.integers(0, 50)),  # from the future
    st.tuples(st.just("joints"), hnp.arrays(np.float64, 8, elements=st.just(0.0)), st.just(True)),  # NaN
    st.tuples(st.just("steps"), st.integers(1, 30)),
), min_size=1, max_size=30))
def test_bad_input_alone_never_moves_the_arm_and_every_refusal_is_counted(script):
    streamer = ChunkStreamer(CONFIG)
    commands = _run(streamer, script)
    for command in commands:
        np.testing.assert_array_equal(command, HOME)  # holding the measured state, bit for bit
    offered = sum(1 for e in script if e[0] in ("chunk", "bad_chunk"))
    nan_states = sum(1 for e in script if e[0] == "joints")
    assert streamer.stats["chunks_accepted"] == 0
    assert streamer.stats["chunks_rejected"] == offered
    assert streamer.stats["joint_states_rejected"] == nan_states
    assert sum(v for k, v in streamer.rejections.items()) == offered + nan_states


@PROPERTY
@given(values=hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(7, 9)), elements=any_float),
       dt=any_float)
def test_a_chunk_the_validator_accepts_is_finite_in_limits_and_plausibly_slow(values, dt):
    reason = check_chunk_values(values, dt, CONFIG)
    if reason is not None:
        assert set(reason_code(reason)) <= CODE_CHARS
        return
    tol = CONFIG.position_tolerance
    assert values.shape[1] == 8 and np.isfinite(values).all() and math.isfinite(dt)
    assert (values >= LOWER - tol).all() and (values <= UPPER + tol).all()
    if len(values) > 1:
        assert (np.abs(np.diff(values, axis=0)) / dt <= CONFIG.max_chunk_speed_factor * VMAX + 1e-9).all()
    assert check_joint_positions(values[0], CONFIG) is None


# ------------------------------------------------------------------------------------ rejections
class _Logger:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, text: str) -> None:
        self.lines.append(text)


@given(reasons=st.lists(st.sampled_from(["bad_shape: x", "non_finite: y", "no code here", "", "a" * 5000]),
                        min_size=1, max_size=200))
@settings(max_examples=50, deadline=None)
def test_rejections_are_all_counted_but_logged_at_most_once_per_kind_per_period(reasons):
    log = _Logger()
    rejections = Rejections(log, log_period_s=3600.0)
    for reason in reasons:
        rejections.reject("image", reason)
    assert rejections.total == len(reasons)
    assert len(log.lines) == len({reason_code(r) for r in reasons})  # one line per kind, not per message
    assert all(len(line) < 400 for line in log.lines)  # a 5000-char reason is cut, never echoed whole
    assert set(rejections.snapshot()) == {f"image:{reason_code(r)}" for r in reasons}


def test_a_guarded_callback_turns_an_exception_into_a_counted_rejection_and_a_fallback_answer():
    rejections = Rejections(_Logger())

    def broken(_msg):
        raise IndexError("boom")

    assert rejections.guard("chunk", broken)(object()) is None
    assert rejections.guard("load_policy", broken, lambda *a: "failed")(object()) == "failed"
    assert rejections.snapshot() == {"chunk:internal": 1, "load_policy:internal": 1}
    assert "IndexError: boom" in rejections.last


def test_short_keeps_log_lines_bounded():
    assert short("x" * 10) == "x" * 10
    assert short("x" * 10_000, 50).endswith("(10000 chars)") and len(short("x" * 10_000, 50)) < 80


@PROPERTY
@given(jitter_s=st.floats(-5e-4, 5e-4), newer_s=st.floats(2e-3, 10.0), last_id=st.integers(1, 2**63),
       id_step=st.integers(-5, 0))
def test_a_chunk_seen_twice_is_refused_even_with_clock_mapping_jitter_but_a_restarted_policy_is_not(
        jitter_s, newer_s, last_id, id_step):
    from m2vla_core.control import check_chunk_order

    last_obs = 1000.0
    repeat = check_chunk_order(last_id + id_step, last_obs + jitter_s, last_sequence_id=last_id,
                               last_observation_s=last_obs, not_before_s=None)
    assert repeat is not None and reason_code(repeat) == "out_of_order"
    restarted = check_chunk_order(1, last_obs + newer_s, last_sequence_id=last_id, last_observation_s=last_obs,
                                  not_before_s=None)
    assert restarted is None
