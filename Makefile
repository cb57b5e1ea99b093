# m2vla — two commands on a fresh clone: `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
M2VLA  := $(VENV)/bin/m2vla
PYTEST_ARGS ?=

.PHONY: setup test demo doctor clean

setup:            ## venv with pinned deps, ROS wheel path fix, colcon build of m2vla_msgs + m2vla_ros
	@bash scripts/setup.sh

test: setup       ## the whole test suite (real DDS between processes, real PyBullet, real onnxruntime)
	@eval "$$($(M2VLA) env)" && $(PY) -m pytest tests $(PYTEST_ARGS)

demo: setup       ## headless sim demo through the real ROS graph with the shipped policy
	@$(M2VLA) demo

doctor: setup
	@$(M2VLA) doctor

clean:
	rm -rf ros2_ws/build ros2_ws/install ros2_ws/log $(VENV)
