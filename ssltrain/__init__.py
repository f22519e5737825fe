"""ssltrain: config-driven self-supervised pretraining behind one Accelerate loop."""

__version__ = "0.1.0"
