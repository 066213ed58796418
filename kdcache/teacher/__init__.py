"""dump-teacher: the teacher once over every view, into a shared Zarr cache."""
