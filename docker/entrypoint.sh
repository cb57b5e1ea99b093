#!/usr/bin/env bash
# Source the apt ROS install and the m2vla workspace, then run the command.
set -e
# shellcheck disable=SC1090
source "/opt/ros/${ROS_DISTRO}/setup.bash"
# shellcheck disable=SC1091
source /opt/m2vla/ros2_ws/install/setup.bash
exec "$@"
