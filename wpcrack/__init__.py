"""wpcrack: weakly-supervised pixel-wise road crack detection (WP-CrackNet)."""

__version__ = "0.1.0"
