"""Commands of this stage register here (see the issue that builds them)."""
