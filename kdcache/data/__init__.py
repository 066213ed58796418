"""Canonical datasets: one global sample index shared by the teacher's shards and the student's beton."""
