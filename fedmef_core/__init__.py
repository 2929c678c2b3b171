"""FedMef and its baselines as a library: config, data, models, SAP, methods, the round loop.

Importing the package first sets how torch will use the CPU (:mod:`fedmef_core.cpu`): those settings are
read when torch loads.
"""

from fedmef_core.cpu import prepare_environment

prepare_environment()
