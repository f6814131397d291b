"""The attribute-extraction figure: its lines are the top-1 and top-k rates of a planted events table, and a
table without any top-1 event says so on the figure."""

from __future__ import annotations

import pandas as pd
import pytest

from fflayers.plots import plot_extraction_rates


def planted(events: set[tuple[int, str, int]], ranks: dict[tuple[int, str, int], int]) -> pd.DataFrame:
    rows = []
    for k in range(4):
        for s in ("attn", "mlp"):
            for layer in range(3):
                hit = (k, s, layer) in events
                rows.append({"known_id": k, "variant": "none", "sublayer": s, "layer": layer, "event": hit,
                             "attribute_rank": 0 if hit else ranks.get((k, s, layer), 50)})
    return pd.DataFrame(rows)


def lines(ax) -> dict[str, list[float]]:
    return {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}


def test_panels_hold_top1_and_topk_rates():
    events = planted({(0, "attn", 1), (1, "attn", 1), (2, "mlp", 2)}, {(3, "attn", 1): 4, (3, "mlp", 0): 9})
    fig = plot_extraction_rates(events, top_k=5)
    left, right = fig.axes
    assert lines(left)["MHSA"] == pytest.approx([0, 50, 0])   # 2 of 4 facts at layer 1
    assert lines(left)["MLP"] == pytest.approx([0, 0, 25])
    assert lines(right)["MHSA"] == pytest.approx([0, 75, 0])  # + fact 3 at rank 4 < 5
    assert lines(right)["MLP"] == pytest.approx([0, 0, 25])   # rank 9 is not in the top 5
    assert not [t for t in left.texts if "no top-1" in t.get_text()]


def test_no_event_is_said_on_the_figure():
    events = planted(set(), {(0, "mlp", 2): 1})
    left, right = plot_extraction_rates(events).axes
    assert [t.get_text() for t in left.texts] == ["no top-1 extraction event\nin any layer (4 facts)"]
    assert lines(right)["MLP"] == pytest.approx([0, 0, 25])
