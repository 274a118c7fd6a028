"""tbps: text-based person search (text-to-image person re-identification)."""

__version__ = "0.1.0"
