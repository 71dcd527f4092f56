"""Lightning callbacks: routing telemetry, mix schedules."""
from .mix_schedule import MixSchedule

__all__ = ["MixSchedule"]
