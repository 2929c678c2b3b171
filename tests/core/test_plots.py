"""The PNGs are DVC outputs hashed in dvc.lock: the same figure must be the same file."""

from fedmef_core.plots import plot_round_curves

HISTORY = [{"round": 1, "accuracy": 0.5, "loss": 1.4, "train_loss": 1.6},
           {"round": 2, "accuracy": 0.6, "loss": 1.2, "train_loss": 1.3}]


def test_the_same_curves_are_the_same_bytes_with_no_matplotlib_version_in_them(tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    plot_round_curves(HISTORY, first, title="t")
    plot_round_curves(HISTORY, second, title="t")
    data = first.read_bytes()
    assert data.startswith(b"\x89PNG") and data == second.read_bytes()
    assert b"Software" not in data and b"matplotlib" not in data.lower()  # matplotlib's default tEXt chunk
