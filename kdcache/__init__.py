"""kdcache: the teacher runs once over augmented views; students replay them with cached soft labels."""

__version__ = "0.2.0"
