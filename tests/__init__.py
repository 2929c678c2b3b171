"""The test suite. Imported before any conftest or test module: it loads ``fedmef_core`` first, which sets how
torch uses the CPU (``fedmef_core.cpu``) before torch loads, so the tests run as users' processes do."""

import fedmef_core  # noqa: F401
