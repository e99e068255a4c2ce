"""Timing: latency measurement (which owns all timing), the bench sweep and its reports, the standard graphs,
the reference benchmark suite and the measurement tools' bodies (`tools/*.py` are argparse shells over these)."""
