"""FLARE22 label ids, organ names and the official NSD tolerances."""

NUM_ORGANS = 13

# Label id -> (full name, short name used in the official CSV, NSD tolerance in mm). Label 0 is background.
ORGANS: dict[int, tuple[str, str, float]] = {
    1: ("liver", "Liver", 5.0),
    2: ("right kidney", "RK", 3.0),
    3: ("spleen", "Spleen", 3.0),
    4: ("pancreas", "Pancreas", 5.0),
    5: ("aorta", "Aorta", 2.0),
    6: ("inferior vena cava", "IVC", 2.0),
    7: ("right adrenal gland", "RAG", 2.0),
    8: ("left adrenal gland", "LAG", 2.0),
    9: ("gallbladder", "Gallbladder", 2.0),
    10: ("esophagus", "Esophagus", 3.0),
    11: ("stomach", "Stomach", 5.0),
    12: ("duodenum", "Duodenum", 7.0),
    13: ("left kidney", "LK", 3.0),
}

ORGAN_LABELS: tuple[int, ...] = tuple(range(1, NUM_ORGANS + 1))
SHORT_NAMES: tuple[str, ...] = tuple(ORGANS[label][1] for label in ORGAN_LABELS)
NSD_TOLERANCE_MM: dict[int, float] = {label: ORGANS[label][2] for label in ORGAN_LABELS}
# The official evaluator crops these tubular organs to the ground truth's axial extent.
Z_CROPPED_LABELS: frozenset[int] = frozenset({5, 6, 10})
