"""ROS message <-> numpy conversions, with every size and value checked at the boundary.

Each ``*_to_array`` / ``msg_to_*`` either returns a correct array or raises
``ConversionError`` (a ``ValueError``) whose message starts with a short code
(``bad_shape``, ``non_finite``, ``bad_encoding``, ``too_large``, ``bad_names``,
``unsupported``, ``mismatch``) followed by a human-readable detail; nodes log it and count the
code. Nothing here imports torch at module level (the controller node must start fast);
FeatureContract/FeatureBundle helpers import ``m2vla_core.features`` lazily.
"""

from __future__ import annotations

import array
import functools
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from sensor_msgs.msg import Image, JointState

from m2vla_msgs.msg import ActionChunk, FeatureContract, LayerFeatures


class ConversionError(ValueError):
    """A message that cannot be converted; ``code`` names the kind of problem."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


# ---------------------------------------------------------------------------------- rejections
INTERNAL = "internal"  # code of an unexpected exception in a callback (a bug, still never a crash)
MAX_REASON_CHARS = 300  # log lines and diagnostics never echo a 1 MB input back


def short(text: object, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` cut to ``limit`` characters (with the original length when cut)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def reason_code(reason: str) -> str:
    """``"code: detail"`` -> ``"code"`` (the whole reason when it has no code)."""
    code = str(reason).split(":", 1)[0].strip()
    return code if code and " " not in code and len(code) <= 40 else "invalid"


class Rejections:
    """Counted, rate-limited rejections of one node's inputs.

    ``reject("image", "bad_encoding: ...")`` counts under ``"image:bad_encoding"`` and logs a
    warning at most once per ``log_period_s`` per key, with how many were refused since the
    last line; so a flood of bad messages costs a counter increment, not a log storm. Keys
    and counts go to /diagnostics. Thread-safe (callbacks may run on several threads).
    """

    def __init__(self, logger: Any, log_period_s: float = 2.0) -> None:
        self.logger = logger
        self.log_period_s = float(log_period_s)
        self.counts: Counter[str] = Counter()
        self.last = ""
        self._lock = threading.Lock()
        self._last_log_s: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()

    def reject(self, what: str, reason: object) -> None:
        reason = short(reason)
        key = f"{what}:{reason_code(reason)}"
        now = time.monotonic()
        with self._lock:
            self.counts[key] += 1
            self.last = f"{what} {reason}"
            if now - self._last_log_s.get(key, -math.inf) < self.log_period_s:
                self._unlogged[key] += 1
                return
            self._last_log_s[key] = now
            suppressed = self._unlogged.pop(key, 0)
        more = f" (+{suppressed} more since the last report)" if suppressed else ""
        self.logger.warning(f"{what} refused: {reason}{more}")

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def guard(self, what: str, callback: Callable, fallback: Callable[..., Any] | None = None) -> Callable:
        """``guard_callback`` counting an unexpected exception here, as a ``<what>:internal`` rejection."""
        return guard_callback(what, callback, self.reject, fallback)


def guard_callback(what: str, callback: Callable, on_error: Callable[[str, str], None],
                   fallback: Callable[..., Any] | None = None) -> Callable:
    """``callback`` that never raises: an unexpected exception goes to ``on_error(what, "internal: ...")``.

    rclpy re-raises callback exceptions out of ``spin()``, which would end the node; a bug
    triggered by one odd message must cost that message, not the robot's controller.
    ``fallback(*args)`` gives the return value in that case (a service's response).
    """

    @functools.wraps(callback)
    def guarded(*args: Any) -> Any:
        try:
            return callback(*args)
        except Exception as exc:  # noqa: BLE001 - see docstring
            on_error(what, f"{INTERNAL}: {type(exc).__name__}: {exc}")
            return fallback(*args) if fallback is not None else None

    return guarded


def failed_service_response(request: Any, response: Any) -> Any:
    """What a guarded service answers when its handler raised: a failure, never a dead node.

    ``error_code`` (where the service has one) is the request type's ``FAILED`` constant, else
    ``BACKEND_ERROR``, else 0.
    """
    response.success = False
    if hasattr(response, "message"):
        response.message = "internal error; see the node log and /diagnostics"
    if hasattr(response, "error_code"):
        response.error_code = getattr(type(request), "FAILED", getattr(type(request), "BACKEND_ERROR", 0))
    return response


def diagnostic_array(name: str, hardware_id: str, level: Any, message: str, items: Mapping[str, Any],
                     stamp: Time) -> DiagnosticArray:
    """One node's /diagnostics message: its status and the ``items`` as key / text value pairs, in order."""
    status = DiagnosticStatus(name=name, hardware_id=hardware_id, level=level, message=message)
    status.values = [KeyValue(key=str(k), value=str(v)) for k, v in items.items()]
    array = DiagnosticArray(status=[status])
    array.header.stamp = stamp
    return array


def diagnostic_values(status: DiagnosticStatus) -> dict[str, str]:
    """One received /diagnostics status as text: its ``message`` and its key / value pairs."""
    return {"message": status.message, **{kv.key: kv.value for kv in status.values}}


# ---------------------------------------------------------------------------------- time
def stamp_to_ns(stamp: Time) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> Time:
    ns = int(ns)
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def arrival_monotonic(info: Mapping[str, Any] | None, *, now_monotonic: float | None = None,
                      now_wall_ns: int | None = None) -> float:
    """When DDS received a message (rclpy's MessageInfo), on this process's monotonic clock.

    A callback runs when the executor takes the message, which can be long after it arrived
    (a busy executor, a sample waiting in the reader's queue): freshness is aged from arrival.
    Without a receive time from the middleware, the take time is all we have.
    """
    now = time.monotonic() if now_monotonic is None else now_monotonic
    received_ns = int((info or {}).get("received_timestamp") or 0)  # wall clock, this machine
    if received_ns <= 0:
        return now
    wall_ns = time.time_ns() if now_wall_ns is None else now_wall_ns
    return now - max(0.0, (wall_ns - received_ns) * 1e-9)  # a wall clock stepped back: take time


# ---------------------------------------------------------------------------------- images
# encoding -> (channels, dtype); 16-bit data honours msg.is_bigendian.
IMAGE_ENCODINGS: dict[str, tuple[int, np.dtype]] = {
    "rgb8": (3, np.dtype(np.uint8)), "bgr8": (3, np.dtype(np.uint8)),
    "rgba8": (4, np.dtype(np.uint8)), "bgra8": (4, np.dtype(np.uint8)),
    "mono8": (1, np.dtype(np.uint8)), "mono16": (1, np.dtype(np.uint16)),
}
DEFAULT_MAX_PIXELS = 3840 * 2160  # 8K-class frames are refused, not resized


def image_to_array(msg: Image, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image -> (H, W, C) array in the message's own encoding ((H, W) for mono), a copy."""
    encoding = str(msg.encoding).strip().lower()
    if encoding not in IMAGE_ENCODINGS:
        raise ConversionError("bad_encoding", f"unsupported image encoding {msg.encoding!r}; "
                                              f"supported: {', '.join(IMAGE_ENCODINGS)}")
    channels, dtype = IMAGE_ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ConversionError("bad_shape", f"image is {width}x{height}; both sides must be > 0")
    if height * width > max_pixels:
        raise ConversionError("too_large", f"image {width}x{height} has {width * height} pixels, more than "
                                           f"max_pixels {max_pixels}")
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ConversionError("bad_shape", f"step {step} B is smaller than width * pixel size = {row_bytes} B "
                                           f"({encoding})")
    data = msg.data
    if len(data) != step * height:
        raise ConversionError("bad_shape", f"data has {len(data)} B, expected step * height = {step * height} B")
    buffer = np.frombuffer(data if isinstance(data, (bytes, bytearray, memoryview)) else bytes(data), dtype=np.uint8)
    rows = buffer.reshape(height, step)[:, :row_bytes]  # (H, row_bytes): drop row padding
    if dtype.itemsize > 1:
        order = ">" if msg.is_bigendian else "<"
        pixels = np.ascontiguousarray(rows).view(dtype.newbyteorder(order)).astype(dtype)  # (H, W * C) native
    else:
        pixels = rows
    if channels == 1:
        return np.array(pixels.reshape(height, width), copy=True)  # (H, W)
    return np.array(pixels.reshape(height, width, channels), copy=True)  # (H, W, C)


def image_to_rgb(msg: Image, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image in any supported encoding -> (H, W, 3) uint8 RGB (mono16 keeps its top 8 bits)."""
    arr = image_to_array(msg, max_pixels=max_pixels)
    encoding = str(msg.encoding).strip().lower()
    if encoding == "mono16":
        arr = (arr >> 8).astype(np.uint8)  # (H, W)
    if arr.ndim == 2:
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))  # (H, W, 3)
    if encoding.startswith("bgr"):
        arr = arr[:, :, 2::-1]  # (H, W, 3) BGR(A) -> RGB
    return np.ascontiguousarray(arr[:, :, :3])  # (H, W, 3)


def array_to_image(arr: np.ndarray, encoding: str = "rgb8", *, stamp: Time | None = None,
                   frame_id: str = "") -> Image:
    """(H, W, C) / (H, W) array -> Image (little-endian, no row padding)."""
    encoding = encoding.lower()
    if encoding not in IMAGE_ENCODINGS:
        raise ConversionError("bad_encoding", f"unsupported image encoding {encoding!r}")
    channels, dtype = IMAGE_ENCODINGS[encoding]
    a = np.asarray(arr)
    expected = 2 if channels == 1 else 3
    if a.ndim != expected or (channels > 1 and a.shape[2] != channels) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ConversionError("bad_shape", f"{encoding} needs shape (H, W{'' if channels == 1 else f', {channels}'}) "
                                           f"with H, W > 0, got {a.shape}")
    if a.dtype != dtype:
        raise ConversionError("bad_shape", f"{encoding} needs dtype {dtype}, got {a.dtype}")
    a = np.ascontiguousarray(a.astype(dtype.newbyteorder("<"), copy=False))
    msg = Image(height=int(a.shape[0]), width=int(a.shape[1]), encoding=encoding, is_bigendian=0,
                step=int(a.shape[1] * channels * dtype.itemsize))
    msg.data = array.array("B", a.tobytes())
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    return msg


# ---------------------------------------------------------------------------------- joint states
# Names the controller / policy use that are not simulator joints: value = sum of the listed joints.
VIRTUAL_JOINTS: dict[str, tuple[str, ...]] = {
    "gripper_opening": ("panda_finger_joint1", "panda_finger_joint2"),  # [m] distance between the fingers
}


def joint_state_to_array(msg: JointState, names: Sequence[str], *,
                         virtual: Mapping[str, Sequence[str]] = VIRTUAL_JOINTS) -> np.ndarray:
    """JointState -> (len(names),) float64 positions in the order of ``names``.

    Extra names in the message are ignored; a missing name (that no virtual joint can derive)
    raises. Non-finite values of the requested joints raise.
    """
    msg_names = [str(n) for n in msg.name]
    positions = np.asarray(msg.position, dtype=np.float64)
    if positions.shape != (len(msg_names),):
        raise ConversionError("bad_shape", f"JointState has {len(msg_names)} names but {positions.size} positions")
    if len(set(msg_names)) != len(msg_names):
        raise ConversionError("bad_names", "JointState names are not unique")
    index = {n: i for i, n in enumerate(msg_names)}
    out = np.empty(len(names), dtype=np.float64)
    missing = []
    for k, name in enumerate(names):
        if name in index:
            out[k] = positions[index[name]]
        elif name in virtual and all(part in index for part in virtual[name]):
            out[k] = float(sum(positions[index[part]] for part in virtual[name]))
        else:
            missing.append(name)
    if missing:
        raise ConversionError("bad_names", f"JointState lacks {missing} (has {msg_names[:12]}"
                                           f"{'...' if len(msg_names) > 12 else ''})")
    if not np.isfinite(out).all():
        bad = [n for n, v in zip(names, out) if not math.isfinite(v)]
        raise ConversionError("non_finite", f"JointState has non-finite positions for {bad}")
    return out


def array_to_joint_state(names: Sequence[str], positions, *, velocities=None, stamp: Time | None = None,
                         frame_id: str = "") -> JointState:
    pos = np.asarray(positions, dtype=np.float64).reshape(-1)
    if pos.shape != (len(names),):
        raise ConversionError("bad_shape", f"{len(names)} names but {pos.size} positions")
    msg = JointState(name=[str(n) for n in names], position=pos.tolist())
    if velocities is not None:
        vel = np.asarray(velocities, dtype=np.float64).reshape(-1)
        if vel.shape != pos.shape:
            raise ConversionError("bad_shape", f"{pos.size} positions but {vel.size} velocities")
        msg.velocity = vel.tolist()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    return msg


# ---------------------------------------------------------------------------------- action chunks
ACTION_SPACES = {"joint": ActionChunk.ACTION_SPACE_JOINT, "eef": ActionChunk.ACTION_SPACE_EEF}


class ChunkSpec(Protocol):
    """What ``chunk_to_msg`` reads from the policy engine (duck-typed)."""

    action_names: Sequence[str]  # one per action dimension
    action_dt_s: float  # [s] between waypoints
    action_space: str  # "joint" | "eef"


@dataclass(frozen=True)
class ChunkFields:
    values: np.ndarray  # (H, A) float64, columns in the requested name order
    names: tuple[str, ...]
    dt_s: float
    stamp_ns: int
    observation_stamp_ns: int
    sequence_id: int
    instruction_id: int
    action_space: int


def chunk_to_msg(values, spec: ChunkSpec | None = None, *, stamp: Time, observation_stamp: Time,
                 sequence_id: int, instruction_id: int = 0, names: Sequence[str] | None = None,
                 dt_s: float | None = None, action_space: str | int | None = None, frame_id: str = "") -> ActionChunk:
    """(H, A) array -> ActionChunk; names / dt / action space from ``spec`` unless given."""
    names = list(names if names is not None else getattr(spec, "action_names"))
    dt_s = float(dt_s if dt_s is not None else getattr(spec, "action_dt_s"))
    space = action_space if action_space is not None else getattr(spec, "action_space", "joint")
    space_id = ACTION_SPACES.get(space, space) if isinstance(space, str) else int(space)
    if space_id not in ACTION_SPACES.values():
        raise ConversionError("unsupported", f"unknown action space {space!r}; use one of {list(ACTION_SPACES)}")
    arr = np.asarray(values, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] != len(names):
        raise ConversionError("bad_shape", f"chunk must be (H >= 1, {len(names)}) for names {names}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ConversionError("non_finite", "chunk has NaN/inf values")
    if not (math.isfinite(dt_s) and dt_s > 0):
        raise ConversionError("bad_shape", f"dt must be finite and > 0, got {dt_s}")
    msg = ActionChunk(action_space=space_id, names=names, horizon=int(arr.shape[0]), dim=int(arr.shape[1]),
                      dt=dt_s, observation_stamp=observation_stamp, sequence_id=int(sequence_id),
                      instruction_id=int(instruction_id))
    msg.values = arr.reshape(-1).tolist()  # row-major (H, A) -> (H * A,)
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    return msg


def msg_to_chunk(msg: ActionChunk, names: Sequence[str] | None = None, *, joint_space_only: bool = True,
                 max_values: int = 1 << 20) -> ChunkFields:
    """ActionChunk -> values (H, A) reordered to ``names`` (default: the message's order)."""
    msg_names = [str(n) for n in msg.names]
    horizon, dim = int(msg.horizon), int(msg.dim)
    if joint_space_only and msg.action_space != ActionChunk.ACTION_SPACE_JOINT:
        raise ConversionError("unsupported", f"action_space {msg.action_space} is not joint positions "
                                             f"({ActionChunk.ACTION_SPACE_JOINT}); end-effector chunks need IK")
    if horizon < 1 or dim < 1 or dim != len(msg_names):
        raise ConversionError("bad_shape", f"horizon {horizon}, dim {dim}, {len(msg_names)} names: need "
                                           f"horizon >= 1 and dim == len(names) >= 1")
    if horizon * dim > max_values or len(msg.values) != horizon * dim:
        raise ConversionError("bad_shape", f"values has {len(msg.values)} entries, expected horizon * dim = "
                                           f"{horizon * dim} (at most {max_values})")
    if len(set(msg_names)) != dim:
        raise ConversionError("bad_names", f"chunk names are not unique: {msg_names}")
    dt = float(msg.dt)
    if not (math.isfinite(dt) and dt > 0):
        raise ConversionError("bad_shape", f"dt must be finite and > 0, got {dt}")
    arr = np.asarray(msg.values, dtype=np.float64).reshape(horizon, dim)  # (H * A,) -> (H, A)
    if not np.isfinite(arr).all():
        raise ConversionError("non_finite", f"{int(arr.size - np.isfinite(arr).sum())} NaN/inf values in the chunk")
    order = msg_names
    if names is not None:
        order = [str(n) for n in names]
        if set(order) != set(msg_names) or len(order) != len(msg_names):
            raise ConversionError("bad_names", f"chunk names {msg_names} do not match the controller's joints {order}")
        index = {n: i for i, n in enumerate(msg_names)}
        arr = arr[:, [index[n] for n in order]]  # (H, A) columns in the requested order
    return ChunkFields(values=np.ascontiguousarray(arr), names=tuple(order), dt_s=dt,
                       stamp_ns=stamp_to_ns(msg.header.stamp), observation_stamp_ns=stamp_to_ns(msg.observation_stamp),
                       sequence_id=int(msg.sequence_id), instruction_id=int(msg.instruction_id),
                       action_space=int(msg.action_space))


# ---------------------------------------------------------------------------------- layer features
WIRE_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
MAX_FEATURE_BYTES = 1 << 30


def encode_hidden(hidden: np.ndarray, dtype: str) -> bytes:
    """float array -> little-endian raw bytes in the wire dtype (bfloat16 rounds to nearest even)."""
    if dtype not in WIRE_DTYPES:
        raise ConversionError("bad_dtype", f"dtype must be one of {list(WIRE_DTYPES)}, got {dtype!r}")
    f32 = np.ascontiguousarray(np.asarray(hidden, dtype=np.float32))
    if dtype == "float32":
        return f32.astype("<f4").tobytes()
    if dtype == "float16":
        return f32.astype("<f2").tobytes()
    bits = f32.view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    rounded[np.isnan(f32)] = 0x7FC0
    return rounded.astype("<u2").tobytes()


def decode_hidden(data, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Raw little-endian bytes -> float32 array of ``shape``; sizes must match exactly."""
    if dtype not in WIRE_DTYPES:
        raise ConversionError("bad_dtype", f"dtype must be one of {list(WIRE_DTYPES)}, got {dtype!r}")
    count = int(np.prod(shape)) if shape else 1
    expected = count * WIRE_DTYPES[dtype]
    if len(data) != expected:
        raise ConversionError("bad_shape", f"data has {len(data)} B, expected {shape} x {WIRE_DTYPES[dtype]} B "
                                           f"({dtype}) = {expected} B")
    raw = data if isinstance(data, (bytes, bytearray, memoryview)) else bytes(data)
    if dtype == "float32":
        out = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    elif dtype == "float16":
        out = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    else:
        out = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return out.reshape(shape)


def _contract_fields(contract: Any) -> tuple[tuple[int, ...], int, int, int, str, int]:
    """(layers, image tokens, text tokens, width, dtype, image size) of a contract or either message."""
    return (tuple(int(x) for x in contract.layers), int(contract.num_image_tokens), int(contract.num_text_tokens),
            int(contract.width), str(contract.dtype), int(getattr(contract, "image_size", 0)))


def msg_to_features(msg: LayerFeatures, contract: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """LayerFeatures -> (hidden float32 (L, T, D), mask bool (T,)).

    With a contract (m2vla_core.features.FeatureContract or a FeatureContract message) the
    message must match it exactly: layers, token counts, width, dtype. Without one, the
    message must be consistent with its own declared sizes.
    """
    declared = _contract_fields(msg)
    layers, n_img, n_txt, width, dtype, size = declared
    if contract is not None:
        expected = _contract_fields(contract)
        if declared != expected:
            raise ConversionError("mismatch", f"features (layers {list(layers)}, tokens {n_img}+{n_txt}, width {width}, "
                                              f"{dtype}, image size {size}) do not match the head's contract (layers "
                                              f"{list(expected[0])}, tokens {expected[1]}+{expected[2]}, width "
                                              f"{expected[3]}, {expected[4]}, image size {expected[5]})")
    if dtype not in WIRE_DTYPES:
        raise ConversionError("bad_dtype", f"dtype must be one of {list(WIRE_DTYPES)}, got {dtype!r}")
    if not layers or list(layers) != sorted(set(layers)):
        raise ConversionError("bad_shape", f"layers must be non-empty and strictly increasing, got {list(layers)}")
    tokens = n_img + n_txt
    if n_img < 1 or n_txt < 0 or width < 1:
        raise ConversionError("bad_shape", f"token counts {n_img}+{n_txt} and width {width} must be positive")
    shape = (len(layers), tokens, width)
    if int(np.prod(shape)) * WIRE_DTYPES[dtype] > MAX_FEATURE_BYTES:
        raise ConversionError("too_large", f"features of shape {shape} exceed {MAX_FEATURE_BYTES} B")
    if len(msg.mask) != tokens:
        raise ConversionError("bad_shape", f"mask has {len(msg.mask)} entries, expected {tokens} tokens")
    mask = np.frombuffer(bytes(msg.mask), dtype=np.uint8)
    if mask.size and int(mask.max()) > 1:
        raise ConversionError("bad_shape", "mask values must be 0 or 1")
    hidden = decode_hidden(msg.data, shape, dtype)  # (L, T, D)
    if not np.isfinite(hidden).all():
        raise ConversionError("non_finite", "features contain NaN/inf")
    return hidden, mask.astype(bool)


def hidden_to_msg(hidden: np.ndarray, mask: np.ndarray, contract: Any, *, stamp: Time | None = None,
                  frame_id: str = "", instruction_id: int = 0, instruction: str = "", backbone_id: str = "",
                  backbone_digest: str = "", compute_ms: float = 0.0, named_objects_xy: Any = ()) -> LayerFeatures:
    layers, n_img, n_txt, width, dtype, size = _contract_fields(contract)
    hidden = np.asarray(hidden)
    mask = np.asarray(mask).reshape(-1)
    if hidden.shape != (len(layers), n_img + n_txt, width):
        raise ConversionError("bad_shape", f"hidden {hidden.shape} != contract {(len(layers), n_img + n_txt, width)}")
    if mask.shape != (n_img + n_txt,):
        raise ConversionError("bad_shape", f"mask {mask.shape} != ({n_img + n_txt},)")
    msg = LayerFeatures(instruction_id=int(instruction_id), instruction=str(instruction),
                        backbone_id=str(backbone_id), backbone_digest=str(backbone_digest), layers=list(layers),
                        num_image_tokens=n_img, num_text_tokens=n_txt, width=width, dtype=dtype, image_size=size,
                        compute_ms=float(compute_ms))
    msg.named_objects_xy = [float(v) for v in np.asarray(named_objects_xy, dtype=np.float32).reshape(-1)]
    msg.mask = array.array("B", mask.astype(np.uint8).tobytes())
    msg.data = array.array("B", encode_hidden(hidden, dtype))
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    return msg


def features_to_msg(bundle: Any, *, stamp: Time, frame_id: str = "", instruction_id: int = 0,
                    backbone_digest: str = "", compute_ms: float = 0.0, named_objects_xy: Any = ()) -> LayerFeatures:
    """m2vla_core.features.FeatureBundle (+ the localiser's reading, if any) -> LayerFeatures in the
    bundle's contract dtype."""
    hidden, mask = bundle.numpy()  # (L, T, D) float32, (T,) bool
    return hidden_to_msg(hidden, mask, bundle.contract, stamp=stamp, frame_id=frame_id,
                         instruction_id=instruction_id, instruction=getattr(bundle, "instruction", ""),
                         backbone_id=getattr(bundle, "backbone_id", ""), backbone_digest=backbone_digest,
                         compute_ms=compute_ms, named_objects_xy=named_objects_xy)


def contract_from_msg(msg: FeatureContract):
    """FeatureContract message -> m2vla_core.features.FeatureContract (validates itself)."""
    from m2vla_core.features import FeatureContract as CoreContract

    layers, n_img, n_txt, width, dtype, size = _contract_fields(msg)
    try:
        return CoreContract(layers=layers, num_image_tokens=n_img, num_text_tokens=n_txt, width=width, dtype=dtype,
                            image_size=size)
    except ValueError as exc:
        raise ConversionError("bad_contract", str(exc)) from None


def contract_to_msg(source: Any, stamp: Time | None = None) -> FeatureContract:
    """A core FeatureContract, or an object with ``.contract`` (+ optional ``checkpoint``,
    ``backbone_id``, ``backbone_digest``, ``localiser_dir``, e.g. the policy engine) -> FeatureContract message."""
    contract = getattr(source, "contract", source)
    layers, n_img, n_txt, width, dtype, size = _contract_fields(contract)
    msg = FeatureContract(checkpoint=str(getattr(source, "checkpoint", "") or ""),
                          backbone_id=str(getattr(source, "backbone_id", "") or ""),
                          backbone_digest=str(getattr(source, "backbone_digest", "") or ""),
                          localiser=str(getattr(source, "localiser_dir", "") or ""),
                          layers=list(layers), num_image_tokens=n_img, num_text_tokens=n_txt, width=width, dtype=dtype,
                          image_size=size)
    if stamp is not None:
        msg.header.stamp = stamp
    return msg
