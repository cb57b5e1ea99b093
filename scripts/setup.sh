#!/usr/bin/env bash
# One idempotent set-up from a fresh clone: project venv with pinned dependencies, the fix for
# the ROS wheels' build-machine paths, and a colcon build of m2vla_msgs + m2vla_ros into
# ros2_ws/install. Each step is skipped when its inputs did not change (stamps in .venv/).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PY=${PYTHON:-python3}
log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi

stamp_ok() { [ -f "$VENV/.stamp-$1" ] && [ "$(cat "$VENV/.stamp-$1")" = "$2" ]; }
stamp_set() { printf '%s' "$2" > "$VENV/.stamp-$1"; }

lock_hash=$(cat requirements.lock requirements-ros.lock | sha256sum | cut -c1-16)
if ! stamp_ok lock "$lock_hash"; then
  log "installing pinned dependencies (requirements.lock, requirements-ros.lock)"
  # torch==2.13.0 is pinned in the lock: an unpinned torch would pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.lock -r requirements-ros.lock
  stamp_set lock "$lock_hash"
fi

core_hash=$(sha256sum m2vla_core/pyproject.toml | cut -c1-16)
if ! stamp_ok core "$core_hash" || ! "$VENV/bin/python" -c 'import m2vla_core' 2>/dev/null; then
  log "installing m2vla_core (editable)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e m2vla_core >"$VENV/.pip-core.log" 2>&1 \
    || { cat "$VENV/.pip-core.log"; exit 1; }
  stamp_set core "$core_hash"
fi

"$VENV/bin/python" scripts/fix_ros_wheel_paths.py "$VENV"

# colcon: rebuild a package only when its own sources changed (m2vla_msgs ~30 s, m2vla_ros ~2 s).
pkg_hash() { find "$1" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16; }
stale=()
for pkg in m2vla_msgs m2vla_ros; do
  h=$(pkg_hash "$pkg")
  if ! stamp_ok "ws-$pkg" "$h" || [ ! -d "ros2_ws/install/share/$pkg" ]; then stale+=("$pkg"); fi
done
if ((${#stale[@]})); then
  mkdir -p ros2_ws/log
  log "colcon build ${stale[*]} -> ros2_ws/install"
  (
    cd ros2_ws
    export PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV"
    export CMAKE_PREFIX_PATH="$VENV" AMENT_PREFIX_PATH="$VENV"
    colcon --log-level error build --merge-install --packages-select "${stale[@]}" \
      --event-handlers console_cohesion- summary- \
      --cmake-args -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF >"$ROOT/ros2_ws/log/colcon_build.txt" 2>&1 \
      || { tail -n 60 "$ROOT/ros2_ws/log/colcon_build.txt"; exit 1; }
  )
  for pkg in "${stale[@]}"; do stamp_set "ws-$pkg" "$(pkg_hash "$pkg")"; done
fi
log "ready: .venv/bin/m2vla doctor"
