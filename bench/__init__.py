"""Benchmarks. Importing the package loads ``fedmef_core`` first, which sets how torch uses the CPU
(``fedmef_core.cpu``) before torch loads, so every benchmark runs as users' processes do."""

import fedmef_core  # noqa: F401
