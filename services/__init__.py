"""Services the flows and tasks call, none of them a Prefect task: the MLflow client (:mod:`services.tracking`),
sweep planning (:mod:`services.sweep`) and a sweep's comparison statistics (:mod:`services.comparison`)."""
