"""leapalign-fast: LeapAlign trainer for FLUX."""

__version__ = "0.1.0"
