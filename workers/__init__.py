"""Worker processes: one per loaded model version; torch lives here, never in the supervisor."""

__all__ = ()
