#!/usr/bin/env bash
# Source the apt ROS install and the m2vla workspace, then run the command.
set -e
# shellcheck disable=SC1090
source "/opt/ros/${ROS_DISTRO}/setup.bash"
# shellcheck disable=SC1091
source /opt/m2vla/ros2_ws/install/setup.bash
# `ros2` runs on the system python: it (and the launch file, which imports m2vla_core) must see the
# venv's packages too.
PYTHONPATH="$(/opt/m2vla/.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH
exec "$@"
