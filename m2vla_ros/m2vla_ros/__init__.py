"""m2vla_ros: thin rclpy nodes over m2vla_core (convert messages, call the library)."""
