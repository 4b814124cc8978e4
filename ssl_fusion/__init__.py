"""sslfuse: fuse several self-supervised pretext encoders for few-label downstream tasks."""

__version__ = "0.1.0"
