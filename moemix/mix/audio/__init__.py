"""Audio mixing: a torch beat tracker and beat-synchronous mixup (MusicLDM)."""
from .beat_tracker import Beats, estimate_tempo, onset_envelope, track_beats
from .beatsync import BeatSyncMixup, LatentBeatSyncMixup

__all__ = ["Beats", "onset_envelope", "estimate_tempo", "track_beats", "BeatSyncMixup", "LatentBeatSyncMixup"]
