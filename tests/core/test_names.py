"""Names made from user text (fedmef_core.names): metric names MLflow accepts, folder names that stay one folder."""

from __future__ import annotations

import pytest

from fedmef_core.names import MAX_METRIC_NAME, folder_name, metric_key


def test_a_metric_name_past_mlflows_limit_is_cut_and_keeps_apart_from_a_neighbour():
    """A 300-character tier name, or a trace budget of 1e300 MiB (a 300-digit tier), made MLflow refuse the run's
    metrics after training."""
    a, b = metric_key("devices", "x" * 300 + "a", "sampled"), metric_key("devices", "x" * 300 + "b", "sampled")
    assert len(a) == len(b) == MAX_METRIC_NAME and a != b and a.startswith("devices/xxx")
    assert metric_key("devices", "small", "sampled") == "devices/small/sampled"  # a usual name, as it was


def test_a_folder_name_with_a_byte_that_is_not_utf8_is_refused_in_words():
    with pytest.raises(ValueError, match="holds a byte that is not UTF-8"):
        folder_name("n\udcff", "the sweep's name")
