"""hybridmask: privacy-preserving face recognition in the frequency domain."""
__version__ = "0.1.0"
