"""Numbers published in the WP-CrackNet paper (Tables 1-5), shown beside ours, never mixed in.

Each row: precision, recall, accuracy, F1, IoU in percent, as printed in the paper.
"""

from __future__ import annotations

PRIMARY = ("precision", "recall", "accuracy", "f1", "iou")

# Table 1 (DeepCrack ablation): keyed by our variant names.
ABLATION_DEEPCRACK: dict[str, tuple[float, ...]] = {
    "cls_det": (90.111, 68.308, 98.305, 77.709, 63.545),
    "rec": (83.920, 74.032, 98.263, 78.666, 64.835),
    "rec_ceccm": (83.828, 78.341, 98.409, 80.992, 68.055),
    "full": (82.868, 80.682, 98.443, 81.760, 69.148),
}

# Tables 2-4: method -> (group, metrics).
COMPARISON: dict[str, dict[str, tuple[str, tuple[float, ...]]]] = {
    "crack500": {
        "Deepcrack19": ("supervised", (57.581, 86.733, 95.687, 69.213, 52.920)),
        "Deepcrack18": ("supervised", (70.919, 70.356, 96.731, 70.636, 54.603)),
        "Crack-Att": ("supervised", (66.497, 70.883, 96.376, 68.620, 52.230)),
        "HrSegNet": ("supervised", (67.652, 74.092, 96.572, 70.726, 54.710)),
        "CT-crackseg": ("supervised", (62.158, 72.126, 96.472, 66.772, 50.119)),
        "AEFT": ("weakly-supervised", (68.406, 26.986, 95.222, 38.703, 23.995)),
        "OC-CSE": ("weakly-supervised", (62.014, 26.897, 94.993, 37.520, 23.092)),
        "VWL": ("weakly-supervised", (85.821, 4.019, 94.598, 7.6782, 3.992)),
        "ACR": ("weakly-supervised", (6.580, 75.302, 38.859, 12.103, 6.441)),
        "WS-SCS": ("weakly-supervised", (72.904, 38.411, 95.759, 50.314, 33.613)),
        "WP-CrackNet": ("weakly-supervised", (71.812, 55.579, 96.298, 62.661, 45.625)),
        "UP-CrackNet": ("unsupervised", (65.377, 58.609, 95.484, 61.808, 44.726)),
    },
    "deepcrack": {
        "Deepcrack19": ("supervised", (88.785, 68.923, 97.756, 77.603, 63.403)),
        "Deepcrack18": ("supervised", (71.720, 88.403, 98.350, 79.192, 65.552)),
        "Crack-Att": ("supervised", (89.967, 69.327, 98.339, 78.310, 64.352)),
        "HrSegNet": ("supervised", (82.492, 80.337, 98.412, 81.400, 68.634)),
        "CT-crackseg": ("supervised", (85.381, 78.838, 98.501, 81.979, 69.461)),
        "AEFT": ("weakly-supervised", (81.899, 68.112, 97.969, 74.372, 59.199)),
        "OC-CSE": ("weakly-supervised", (89.786, 66.131, 98.209, 76.164, 61.504)),
        "VWL": ("weakly-supervised", (86.356, 56.650, 97.738, 68.418, 51.996)),
        "ACR": ("weakly-supervised", (88.339, 66.424, 98.168, 75.829, 61.069)),
        "WS-SCS": ("weakly-supervised", (98.499, 30.722, 96.952, 46.836, 30.579)),
        "WP-CrackNet": ("weakly-supervised", (82.868, 80.682, 98.443, 81.760, 69.148)),
        "UP-CrackNet": ("unsupervised", (63.412, 88.852, 98.049, 74.006, 58.738)),
    },
    "cfd": {
        "Deepcrack19": ("supervised", (20.892, 88.142, 94.372, 33.778, 20.321)),
        "Deepcrack18": ("supervised", (46.231, 69.159, 98.188, 55.417, 38.329)),
        "Crack-Att": ("supervised", (70.086, 43.530, 98.778, 53.705, 36.710)),
        "HrSegNet": ("supervised", (29.782, 43.474, 98.322, 35.348, 21.469)),
        "CT-crackseg": ("supervised", (60.907, 54.916, 98.692, 57.757, 40.604)),
        "AEFT": ("weakly-supervised", (93.233, 4.008, 98.432, 7.685, 3.996)),
        "OC-CSE": ("weakly-supervised", (81.154, 6.397, 98.452, 11.860, 6.304)),
        "VWL": ("weakly-supervised", (94.161, 3.746, 98.429, 7.206, 3.738)),
        "ACR": ("weakly-supervised", (80.268, 4.217, 98.423, 8.013, 4.174)),
        "WS-SCS": ("weakly-supervised", (77.764, 2.485, 98.400, 4.816, 2.468)),
        "WP-CrackNet": ("weakly-supervised", (62.262, 49.682, 98.690, 55.265, 38.184)),
        "UP-CrackNet": ("unsupervised", (10.978, 63.785, 90.987, 18.731, 10.333)),
    },
}

# Table 5: parameters (millions) and FPS on an RTX 3090 at 256x256.
WPCRACKNET_PARAMS_M = 86.458
WPCRACKNET_FPS_RTX3090 = 73.613
