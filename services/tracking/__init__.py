"""Everything that talks to MLflow — the only code outside ``bench/`` and ``tests/`` that imports it
(``tests/test_layout.py`` checks): runs, their metrics, tags, inputs and artifacts (:mod:`.tracker`), and the
trained model as a logged and registered model (:mod:`.logged_models`)."""
