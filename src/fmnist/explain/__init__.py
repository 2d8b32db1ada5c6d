"""What a trained model looks at.

- `attribution`: heatmaps of single images (Captum) and their faithfulness check; no
  matplotlib, so the service can import it.
- `pictures`: the pictures of `fmnist explain` (heatmaps beside the top classes, filters,
  activations, the feature map, confused pairs), drawn with matplotlib.
"""

from fmnist.explain.attribution import (
    DEFAULT_METHOD,
    METHODS,
    Faithfulness,
    attribute,
    check_captum,
    faithfulness,
    heatmap_json,
    overlay_png,
    remove_top,
)

__all__ = ["DEFAULT_METHOD", "METHODS", "Faithfulness", "attribute", "check_captum", "faithfulness",
           "heatmap_json", "overlay_png", "remove_top"]
