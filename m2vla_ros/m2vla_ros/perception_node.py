"""Perception node: camera + instruction -> frozen VLM -> /m2vla/features.

Subscriptions only store the newest frame / instruction / contract (newest wins, never
block); one worker thread runs the backbone when something changed: a new instruction, or a
new frame once ``refresh_period_s`` has passed. It computes exactly the feature contract the
policy announced on /m2vla/feature_contract (layers, tokens, dtype) and stops the VLM at the
deepest layer the head reads. Bad input is refused with a rate-limited log line and a
counter per kind in /diagnostics (``image:bad_encoding``, ``instruction:empty``, ...), never a
crash: every callback is guarded, an unexpected exception is counted as ``<input>:internal``.

When the contract names an object localiser (a head that reads the named objects' positions),
the worker reads them once per instruction, from the first frame received after the instruction
(so not a frame of the scene before a reset; the arm has not moved yet), and every LayerFeatures
of that instruction carries them. No features go out for the instruction before that frame; a
failed reading is counted, logged and retried on the next frame, and until one succeeds the
features go out without positions (the policy then holds still).

Instruction ids start at the node's start time in milliseconds and increase by one per
accepted instruction, so they keep increasing across a restart of this node (the policy and
operators compare them: a restarted perception must not look older than the one it replaced).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.node import Node
from sensor_msgs.msg import Image
from std_msgs.msg import String
from visualization_msgs.msg import Marker, MarkerArray

from m2vla_core.instructions import InstructionError, clean_instruction
from m2vla_core.perception import PerceptionConfig, PerceptionEngine
from m2vla_msgs.msg import FeatureContract, LayerFeatures
from m2vla_ros import node_process, qos
from m2vla_ros.conversions import (Rejections, contract_from_msg, diagnostic_array, features_to_msg, image_to_rgb,
                                   short)
from m2vla_ros.executor import SingleSubmitMultiThreadedExecutor
from m2vla_ros.params import declare_parameters

PARAMETERS = {
    "backbone": ("", "hub id or local dir of the VLM; empty = shipped tiny Qwen2-VL"),
    "device": ("cpu", "cpu | cuda"),
    "image_topic": ("/camera/image_raw", "sensor_msgs/Image topic"),
    "refresh_period_s": (0.1, "[s] min time between backbone runs on new frames", (0.0, 10.0)),
    "max_image_age_s": (1.0, "[s] frames older than this are ignored", (0.01, 60.0)),
    "max_image_pixels": (8294400, "frames with more pixels are refused", (1, 100_000_000)),
    "max_instruction_bytes": (2048, "longer instructions are refused", (1, 1_000_000)),
    "cache_bytes": (PerceptionConfig.cache_bytes, "[B] in-process feature cache bound", (0, 1 << 34)),
    "stop_at_deepest_layer": (True, "run the VLM only up to the deepest layer the head reads"),
    "reuse_instruction": (True, "reuse the instruction's computation across frames where supported"),
    "torch_threads": (1, "CPU threads of the backbone; more starve the controller on a small machine", (1, 256)),
    "base_frame": ("panda_link0", "frame of the object localiser's positions (/m2vla/named_objects markers)"),
}
CUBE_COLOUR, TARGET_COLOUR = (1.0, 0.5, 0.0), (0.2, 0.6, 1.0)  # rviz: where the policy is told the objects are


@dataclass
class _Frame:
    rgb: np.ndarray  # (H, W, 3) uint8
    stamp: object  # builtin_interfaces/Time
    frame_id: str
    received_s: float  # monotonic
    used: bool = False  # the backbone ran on it (a frame replaced before that was skipped: newest wins)


class PerceptionNode(Node):
    def __init__(self) -> None:
        super().__init__("m2vla_perception")
        self.p = declare_parameters(self, PARAMETERS)
        self.engine = PerceptionEngine(PerceptionConfig(
            backbone=self.p["backbone"], device=self.p["device"], cache_bytes=int(self.p["cache_bytes"]),
            stop_at_deepest_layer=bool(self.p["stop_at_deepest_layer"]),
            reuse_instruction=bool(self.p["reuse_instruction"]),
        ))
        self.rejections = Rejections(self.get_logger())
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._frame: _Frame | None = None
        self._instruction: tuple[int, str, float] | None = None  # (instruction_id, text, received monotonic)
        self._contract = None
        self._contract_msg: FeatureContract | None = None
        self._localiser_dir = ""  # the contract's object localiser ("" = the head reads no positions)
        self._named: tuple[tuple[int, str], np.ndarray] | None = None  # ((instruction id, localiser), x, y)
        self._instruction_counter = time.time_ns() // 1_000_000  # see the module docstring
        self.counters = {"frames": 0, "frames_rejected": 0, "frames_skipped": 0, "frames_too_old": 0,
                         "instructions": 0, "instructions_rejected": 0, "contracts_rejected": 0,
                         "features_published": 0, "backbone_errors": 0, "localiser_readings": 0,
                         "localiser_errors": 0}
        self._localiser_ms = 0.0  # the last reading's time
        self._backbone_ready = False

        self.features_pub = self.create_publisher(LayerFeatures, "/m2vla/features", qos.FEATURES)
        self.named_pub = self.create_publisher(MarkerArray, "/m2vla/named_objects", qos.STATUS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", qos.STATUS)
        guard = self.rejections.guard
        self.create_subscription(Image, self.p["image_topic"], guard("image", self._on_image), qos.SENSOR)
        self.create_subscription(String, "/m2vla/instruction", guard("instruction", self._on_instruction),
                                 qos.INSTRUCTION)
        self.contract_sub = self.create_subscription(FeatureContract, "/m2vla/feature_contract",
                                                     guard("contract", self._on_contract), qos.LATCHED)
        self.create_timer(1.0, guard("diagnostics", self._publish_diagnostics))

        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="backbone-worker", daemon=True)
        self._worker.start()

    # -- subscriptions: validate, store newest, wake the worker --------------------------------
    def _on_image(self, msg: Image) -> None:
        try:
            rgb = image_to_rgb(msg, max_pixels=int(self.p["max_image_pixels"]))
            self.engine.check_image(rgb)
        except ValueError as exc:
            self.counters["frames_rejected"] += 1
            self.rejections.reject("image", exc)
            return
        self.counters["frames"] += 1
        with self._lock:
            if self._frame is not None and not self._frame.used:
                self.counters["frames_skipped"] += 1
            self._frame = _Frame(rgb, msg.header.stamp, short(msg.header.frame_id, 256), time.monotonic())
        self._wake.set()

    def _on_instruction(self, msg: String) -> None:
        try:
            text = clean_instruction(msg.data, max_bytes=int(self.p["max_instruction_bytes"]))
        except InstructionError as exc:
            self.counters["instructions_rejected"] += 1
            self.rejections.reject("instruction", exc)
            return
        with self._lock:  # every accepted message is a new instruction id; the worker takes the newest
            self._instruction_counter += 1
            self._instruction = (self._instruction_counter, text, time.monotonic())
        self.counters["instructions"] += 1
        self.get_logger().info(f"instruction #{self._instruction_counter}: {short(text, 200)!r}",
                               throttle_duration_sec=0.5)  # an instruction flood must not flood the log
        self._wake.set()

    def _on_contract(self, msg: FeatureContract) -> None:
        try:
            contract = contract_from_msg(msg)
        except ValueError as exc:
            self.counters["contracts_rejected"] += 1
            self.rejections.reject("contract", exc)
            return
        try:
            if contract.image_size ** 2 > int(self.p["max_image_pixels"]):
                raise ValueError(f"the head reads {contract.image_size} px frames, more than max_image_pixels")
            self.engine.check_contract(contract, msg.backbone_digest)
        except ValueError as exc:
            self.counters["contracts_rejected"] += 1
            self.rejections.reject("contract", f"mismatch: {exc}")
            return
        localiser_dir = short(msg.localiser, 4096)
        with self._lock:
            unchanged = (contract, localiser_dir) == (self._contract, self._localiser_dir)
            self._contract, self._contract_msg, self._localiser_dir = contract, msg, localiser_dir
        if unchanged:
            return  # the policy republishes its contract every contract_period_s
        self.get_logger().info(f"feature contract: layers {list(contract.layers)}, "
                               f"{contract.num_image_tokens}+{contract.num_text_tokens} tokens, {contract.dtype}"
                               + (f", {contract.image_size} px frames" if contract.image_size else "")
                               + (f", object localiser {localiser_dir}" if localiser_dir else ""))
        self._wake.set()

    # -- worker -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.p["device"] == "cpu":  # intra-op threads busy-wait: bounded, so the 250 Hz loop keeps a core
                import torch

                torch.set_num_threads(int(self.p["torch_threads"]))
            self.engine.load()
            self._backbone_ready = True
            self.get_logger().info(f"backbone ready: {self.engine.backbone_id}")
        except Exception as exc:  # noqa: BLE001 - a node that cannot load its VLM reports, not crashes
            self.get_logger().fatal(f"cannot load backbone {self.p['backbone']!r}: {exc}")
            return
        last_key = None
        last_run_s = 0.0
        last_too_old: _Frame | None = None
        while not self._stop.is_set():
            self._wake.wait(timeout=0.1)
            self._wake.clear()
            with self._lock:
                frame, instruction, contract = self._frame, self._instruction, self._contract
                localiser_dir = self._localiser_dir
                if frame is not None:
                    frame.used = True
            if frame is None or instruction is None or contract is None:
                continue
            if not self._fresh(frame):
                if frame is not last_too_old:  # count each frame once, not every wake-up
                    last_too_old = frame
                    self.counters["frames_too_old"] += 1
                continue
            key = (id(frame), instruction[0], contract, localiser_dir)
            if key == last_key:
                continue
            same_instruction = last_key is not None and last_key[1:] == key[1:]
            wait_s = float(self.p["refresh_period_s"]) - (time.monotonic() - last_run_s)
            if same_instruction and wait_s > 0:
                # throttle re-runs on new frames; a new instruction (or a stop) wakes it and goes at once
                self._wake.wait(wait_s)
                self._wake.set()
                continue
            last_key, last_run_s = key, time.monotonic()
            try:
                if self.engine.serve(contract):
                    self.get_logger().info(f"backbone switched to {self.engine.backbone.image_size} px frames, "
                                           "the input size of the head's contract")
                if min(frame.rgb.shape[:2]) < contract.image_size:
                    self.get_logger().warning(f"camera frames are {frame.rgb.shape[1]}x{frame.rgb.shape[0]} px, smaller "
                                           f"than the head's {contract.image_size} px input: they are upsampled",
                                           throttle_duration_sec=10.0)
                named_xy = self._named_objects(frame, instruction, localiser_dir)
                if named_xy is None:  # the localiser waits for a frame taken after the instruction
                    last_run_s = 0.0  # which then goes at once
                    continue
                bundle, compute_ms = self.engine.extract(frame.rgb, instruction[1], contract)
                msg = features_to_msg(bundle, stamp=frame.stamp, frame_id=frame.frame_id,
                                      instruction_id=instruction[0], backbone_digest=self.engine.backbone_digest,
                                      compute_ms=compute_ms, named_objects_xy=named_xy)
                self.features_pub.publish(msg)
            except Exception as exc:  # noqa: BLE001 - the worker must survive any frame
                if not self.context.ok():
                    break  # shutting down
                self.counters["backbone_errors"] += 1
                self.rejections.reject("backbone", f"error: {type(exc).__name__}: {exc}")
                continue
            self.counters["features_published"] += 1

    def _named_objects(self, frame: _Frame, instruction: tuple[int, str, float],
                       localiser_dir: str) -> np.ndarray | tuple | None:
        """The named objects' x, y for this instruction: read by the contract's localiser from the
        first frame received after the instruction, then reused; () when the head needs none or the
        reading failed; None while ``frame`` came before the instruction."""
        try:
            if self.engine.use_localiser(localiser_dir) and localiser_dir:
                self.get_logger().info(f"object localiser ready: {localiser_dir} "
                                       f"({self.engine.reader.image_size} px frames)")
        except ValueError as exc:
            self.counters["contracts_rejected"] += 1
            self.rejections.reject("contract", f"localiser: {exc}")
        if self.engine.reader is None:
            return ()
        reading = (instruction[0], localiser_dir)
        if self._named is None or self._named[0] != reading:
            if frame.received_s < instruction[2]:
                return None
            if min(frame.rgb.shape[:2]) < self.engine.reader.image_size:
                self.get_logger().warning(f"camera frames are {frame.rgb.shape[1]}x{frame.rgb.shape[0]} px, smaller "
                                          f"than the object localiser's {self.engine.reader.image_size} px input: "
                                          "they are upsampled and it reads them less precisely",
                                          throttle_duration_sec=10.0)
            t0 = time.perf_counter()
            try:
                xy = self.engine.read_named_objects(frame.rgb, instruction[1])
            except InstructionError as exc:  # names nothing the localiser knows: refused once, the policy holds
                self.counters["instructions_rejected"] += 1
                self.rejections.reject("instruction", exc)
                self._named = (reading, ())
                return ()
            except ValueError as exc:
                self.counters["localiser_errors"] += 1
                self.rejections.reject("localiser", exc)
                return ()
            self._localiser_ms = (time.perf_counter() - t0) * 1e3
            self._named = (reading, xy)
            self.counters["localiser_readings"] += 1
            self.get_logger().info(f"instruction #{instruction[0]}: named cube at ({xy[0]:.3f}, {xy[1]:.3f}) m, "
                                   f"target at ({xy[2]:.3f}, {xy[3]:.3f}) m ({self._localiser_ms:.0f} ms)")
            self._publish_named_markers(xy)
        return self._named[1]

    def _publish_named_markers(self, xy: np.ndarray) -> None:
        """Two markers on the table where the localiser read the named cube (box) and its target (disc)."""
        stamp = self.get_clock().now().to_msg()
        markers = []
        for marker_id, (x, y), shape, size, colour in ((0, xy[:2], Marker.CUBE, (0.05, 0.05, 0.05), CUBE_COLOUR),
                                                        (1, xy[2:], Marker.CYLINDER, (0.09, 0.09, 0.004), TARGET_COLOUR)):
            marker = Marker(ns="m2vla_named_objects", id=marker_id, type=shape, action=Marker.ADD)
            marker.header.frame_id, marker.header.stamp = self.p["base_frame"], stamp
            marker.pose.position.x, marker.pose.position.y, marker.pose.position.z = float(x), float(y), size[2] / 2
            marker.pose.orientation.w = 1.0
            marker.scale.x, marker.scale.y, marker.scale.z = size
            marker.color.r, marker.color.g, marker.color.b = colour
            marker.color.a = 0.5
            markers.append(marker)
        self.named_pub.publish(MarkerArray(markers=markers))

    def _publish_diagnostics(self) -> None:
        rejections = self.rejections.snapshot()
        rejected = sum(rejections.values())
        with self._lock:
            contract, frame, instruction = self._contract, self._frame, self._instruction
        fresh_frame = frame is not None and self._fresh(frame)
        level, message = DiagnosticStatus.OK, self._waiting_for(contract, fresh_frame, instruction is not None)
        if self.counters["backbone_errors"] or rejected:
            level, message = DiagnosticStatus.WARN, f"{rejected} inputs refused; {message}"
        items = {**self.counters, **self.engine.stats(), **rejections, "rejected_total": rejected,
                 "last_rejection": self.rejections.last, "backbone_ready": self._backbone_ready,
                 "contract_layers": ",".join(map(str, contract.layers)) if contract is not None else "",
                 "contract_image_size": contract.image_size if contract is not None else "",
                 "backbone_image_size": self.engine.backbone.image_size if self._backbone_ready else "",
                 "localiser": self.engine.localiser_dir if self.engine.reader is not None else "",
                 "localiser_ms_last": f"{self._localiser_ms:.1f}"}
        self.diag_pub.publish(diagnostic_array("m2vla_perception", self.engine.backbone_id or "", level, message, items,
                                               self.get_clock().now().to_msg()))

    def _fresh(self, frame: _Frame) -> bool:
        return time.monotonic() - frame.received_s <= float(self.p["max_image_age_s"])

    def _waiting_for(self, contract, fresh_frame: bool, has_instruction: bool) -> str:
        """What the worker still lacks before it can publish features ("ok" when nothing)."""
        missing = [what for what, ok in (("the backbone to load", self._backbone_ready),
                                         (self._contract_wait() if contract is None else "", contract is not None),
                                         ("a camera frame younger than max_image_age_s", fresh_frame),
                                         ("an instruction", has_instruction)) if not ok]
        return f"waiting for {', '.join(missing)}" if missing else "ok"

    def _contract_wait(self) -> str:
        """Names how many contract publishers DDS matched: 0 says discovery, not the policy, is at fault."""
        try:
            matched = self.contract_sub.get_publisher_count()
        except Exception:  # noqa: BLE001 - a subscription torn down at shutdown
            matched = "?"
        return f"the policy's feature contract ({matched} publisher(s) matched)"

    def destroy_node(self) -> None:
        self._stop.set()
        self._wake.set()
        self._worker.join(timeout=5.0)
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    node_process.run("m2vla_perception", PerceptionNode, lambda: SingleSubmitMultiThreadedExecutor(num_threads=2),
                     args=args)


if __name__ == "__main__":
    main()
