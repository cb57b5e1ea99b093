"""ament_python build of m2vla_ros (colcon) — also installs launch files, parameters and rviz config."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "m2vla_ros"
NODES = ["perception_node", "policy_node", "controller_node", "sim_node"]

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
        (f"share/{PACKAGE}/rviz", glob("rviz/*.rviz")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="m2vla developers",
    maintainer_email="dev@m2vla.org",
    description="rclpy nodes of m2vla over m2vla_core.",
    license="Apache-2.0",
    entry_points={"console_scripts": [f"{n} = {PACKAGE}.{n}:main" for n in NODES]},
)
