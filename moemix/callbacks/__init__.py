"""Lightning callbacks: routing telemetry, mix schedules."""
from .mix_schedule import MixSchedule
from .routing_telemetry import RoutingTelemetry, load_heatmap, moe_layers

__all__ = ["MixSchedule", "RoutingTelemetry", "load_heatmap", "moe_layers"]
